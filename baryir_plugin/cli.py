"""Command line: ``basicsr train|test`` (BasicSR's own pipelines with the plugins loaded) and ``baryir ...``.

``basicsr train -opt FILE.yml [--launcher none|pytorch|slurm] [--auto_resume] [--debug]
[--local_rank N] [--force_yml a:b=v ...]`` runs ``basicsr.train.train_pipeline`` with the current
working directory as BasicSR's root (so ``experiments/``, ``results/`` and ``tb_logger/`` land there),
after importing every package registered in the ``basicsr.plugins`` entry-point group. basicsr ships
no console script of its own; ``baryir train|test`` is the same command under our own name.

Option files may write ``${data_root}`` in their paths (e.g. ``dataroot_gt: ${data_root}/CBSD68``); the
root comes from ``--data-root DIR`` (a flag of this command, not of BasicSR) or the ``BARYIR_DATA_ROOT``
environment variable, so one file serves every machine.

Multi-process: ``torchrun --standalone --nproc_per_node=N -m baryir_plugin train -opt FILE.yml --launcher pytorch``
(NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from typing import Optional, Sequence

from baryir_plugin.errors import OptionError, SetupError, UsageError, debug_requested, run_guarded

PLUGIN_GROUP = 'basicsr.plugins'
# `baryir <command>` beyond the pipelines and convert-official: each module's add_command(subparsers)
# adds its parser (with set_defaults(func=run), run(args) -> exit status)
COMMAND_MODULES = ('baryir_plugin.inference.infer', 'baryir_plugin.inference.export',
                   'baryir_plugin.analysis.complexity', 'baryir_plugin.analysis.figures')
PIPELINES = ('train', 'test')
DATA_ROOT_PLACEHOLDER = '${data_root}'
DATA_ROOT_ENV = 'BARYIR_DATA_ROOT'
# resolved copy of an option file -> the file the user gave, for error messages
_OPTION_FILE_ALIASES: dict[str, str] = {}


def load_plugins() -> list[str]:
    """Import this plugin and every package registered under the ``basicsr.plugins`` entry-point group."""
    from importlib.metadata import entry_points

    import baryir_plugin  # noqa: F401  (compat patches + registrations come first)

    loaded = ['baryir_plugin']
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.value.split(':')[0] == 'baryir_plugin':
            continue
        try:
            ep.load()
        except Exception as e:  # a broken third-party plugin must say which one it is
            raise SetupError(f"basicsr plugin {ep.name!r} ({ep.value}) from the '{PLUGIN_GROUP}' entry points "
                             f'failed to import ({type(e).__name__}: {e}); fix or uninstall that package.') from e
        loaded.append(ep.value)
    return loaded


def _normalise_basicsr_args(argv: Sequence[str]) -> list[str]:
    """Accept torch.distributed.launch's ``--local-rank`` and add ``--launcher pytorch`` under torchrun."""
    args = []
    for a in argv:
        if a == '--local-rank':
            a = '--local_rank'
        elif a.startswith('--local-rank='):
            a = '--local_rank=' + a.split('=', 1)[1]
        args.append(a)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not any(a == '--launcher' or a.startswith('--launcher=')
                                                              for a in args):
        print('basicsr: WORLD_SIZE > 1 and no --launcher given: using --launcher pytorch.', file=sys.stderr)
        args += ['--launcher', 'pytorch']
    return args


def _check_opt_file(kind: str, argv: Sequence[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-opt')
    known, _ = pre.parse_known_args(argv)
    if known.opt is None:
        raise UsageError(f'the option file is missing; usage: basicsr {kind} -opt FILE.yml')
    if os.path.exists(known.opt) and not os.path.isfile(known.opt):
        raise UsageError(f'-opt {known.opt!r} is not a regular file (a folder, a pipe or a device); give the YAML '
                         'option file.')
    if not os.path.isfile(known.opt):
        raise UsageError(f'-opt {known.opt!r}: no such file (paths are relative to {os.getcwd()}).')
    return known.opt


def _pop_data_root(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """Remove ``--data-root DIR`` / ``--data-root=DIR`` from argv (BasicSR's parser would refuse it)."""
    out, root, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == '--data-root':
            if i + 1 >= len(argv):
                raise UsageError('--data-root needs a folder, e.g. --data-root ../data')
            root, i = argv[i + 1], i + 2
            continue
        if a.startswith('--data-root='):
            root = a.split('=', 1)[1]
        else:
            out.append(a)
        i += 1
    return out, root


def resolve_data_root(opt_path: str, data_root: Optional[str], out_dir: Optional[str] = None) -> str:
    """Return an option file with ``${data_root}`` replaced (a copy in out_dir, default a new temporary
    folder), or opt_path itself when it has no placeholder."""
    try:
        with open(opt_path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise OptionError(f'{opt_path}: not a text file ({e.reason} at byte {e.start}); give a YAML option '
                          'file.') from None
    if DATA_ROOT_PLACEHOLDER not in text:
        if data_root is not None:
            print(f'basicsr: --data-root given but {opt_path} has no {DATA_ROOT_PLACEHOLDER} placeholder; ignored.',
                  file=sys.stderr)
        return opt_path
    data_root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not data_root:
        raise UsageError(f'{opt_path} reads its images from {DATA_ROOT_PLACEHOLDER}; pass --data-root DIR '
                         f'(or set {DATA_ROOT_ENV}).')
    if not os.path.isdir(data_root):
        raise UsageError(f'--data-root {data_root!r} is not a folder (relative to {os.getcwd()}).')
    import yaml

    # substituted into the parsed values, not the text: a root holding '#', ': ' or quotes stays one path
    with open(opt_path, encoding='utf-8') as f:
        options = yaml.safe_load(f)
    root = os.path.abspath(data_root).replace(os.sep, '/')

    def substitute(node):
        if isinstance(node, str):
            return node.replace(DATA_ROOT_PLACEHOLDER, root)
        if isinstance(node, dict):
            return {key: substitute(value) for key, value in node.items()}
        if isinstance(node, list):
            return [substitute(value) for value in node]
        return node

    out = os.path.join(out_dir or tempfile.mkdtemp(prefix='basicsr_opt_'), os.path.basename(opt_path))
    if os.path.abspath(out) == os.path.abspath(opt_path):
        raise ValueError(f'resolve_data_root: refusing to overwrite the option file {opt_path}; give another out_dir.')
    with open(out, 'w', encoding='utf-8') as f:
        yaml.safe_dump(substitute(options), f, sort_keys=False, allow_unicode=True)
    return out


def run_pipeline(kind: str, argv: Sequence[str]) -> None:
    """Run BasicSR's ``train_pipeline``/``test_pipeline`` with BasicSR's own flags."""
    if kind not in PIPELINES:
        raise ValueError(f'unknown pipeline {kind!r}; use one of {PIPELINES}.')
    argv, data_root = _pop_data_root(_normalise_basicsr_args(argv))
    if not any(a in ('-h', '--help') for a in argv):
        opt_path = _check_opt_file(kind, argv)
        resolved = resolve_data_root(opt_path, data_root)
        if resolved != opt_path:
            argv = [resolved if a == opt_path else a for a in argv]
            _OPTION_FILE_ALIASES[resolved] = opt_path
    load_plugins()
    from baryir_plugin import compat

    root = os.environ.get('BASICSR_ROOT') or os.getcwd()
    sys.argv = [f'basicsr {kind}', *argv]
    if kind == 'train':
        from basicsr.train import train_pipeline as pipeline
    else:
        from basicsr.test import test_pipeline as pipeline
    pipeline(root)

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        compat.shutdown_distributed()
        # Skip interpreter teardown: daemon threads of finished loaders can abort it on gloo ranks.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _usage(prog: str) -> str:
    return (f'usage: {prog} {{train,test}} -opt FILE.yml [--launcher {{none,pytorch,slurm}}] [--auto_resume] '
            '[--debug] [--local_rank N] [--force_yml KEY=VALUE ...] [--data-root DIR]')


def basicsr_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``basicsr`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_usage('basicsr'))
        print('Runs BasicSR\'s own pipelines with every package of the "basicsr.plugins" entry points loaded.')
        return 0 if argv else 2
    if argv[0] in ('--version', '-V'):
        import basicsr

        from baryir_plugin.version import __version__
        print(f'basicsr {basicsr.__version__} (command from baryir-plugin {__version__})')
        return 0
    if argv[0] not in PIPELINES:
        print(f'basicsr: unknown command {argv[0]!r}.\n{_usage("basicsr")}', file=sys.stderr)
        return 2
    return guarded_pipeline(argv[0], argv[1:])


def guarded_pipeline(kind: str, argv: Sequence[str]) -> int:
    """:func:`run_pipeline` behind the error boundary (one line per bad input, ``--debug`` for tracebacks)."""
    status = run_guarded(f'basicsr {kind}', lambda: run_pipeline(kind, argv), debug=debug_requested(argv),
                         aliases=_OPTION_FILE_ALIASES)
    if status:
        _exit_if_distributed(status)
    return status


def _exit_if_distributed(status: int) -> None:
    """After an error under torchrun, leave at once: a normal interpreter exit can wait forever on the
    process group and the loader workers of a run that stopped half-way."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


# --------------------------------------------------------------------------------------------------
def _convert_official(args: argparse.Namespace) -> int:
    import yaml

    from baryir_plugin import compat
    from baryir_plugin.official import convert_official, potentials_output_path

    from baryir_plugin.errors import UsageError

    outputs = [args.output]
    if not args.no_potentials:
        outputs.append(args.potentials_out or potentials_output_path(args.output))
    for out in outputs:
        if os.path.exists(args.input) and os.path.exists(out) and os.path.samefile(args.input, out):
            raise UsageError(f'the output {out} is the input checkpoint; write the converted file elsewhere (the '
                             'release file is kept as it is).')
    if len(outputs) == 2 and os.path.abspath(outputs[0]) == os.path.abspath(outputs[1]):
        raise UsageError(f'--potentials-out {outputs[1]} is the network_g output too; give the potentials a file '
                         'of their own (or --no-potentials).')
    existing = [out for out in outputs if os.path.exists(out)]
    if existing and not args.overwrite:
        raise UsageError(f'{", ".join(existing)} exist(s) already; pass --overwrite to replace, or choose another '
                         'output.')
    net_g, net_potential = convert_official(args.input)
    if args.no_potentials:
        net_potential = None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    compat.atomic_torch_save(net_g, args.output)
    print(f'wrote {args.output} (network_g, {sum(t.numel() for t in net_g["params"].values()):,} parameters)')
    if net_potential is not None:
        pot_path = args.potentials_out or potentials_output_path(args.output)
        compat.atomic_torch_save(net_potential, pot_path)
        print(f'wrote {pot_path} (network_potential)')
    print('\nnetwork_g options for your YAML file:')
    print(yaml.safe_dump({'network_g': net_g['baryir_config']}, sort_keys=False, default_flow_style=None))
    if net_potential is not None:
        print('network_potential options:')
        print(yaml.safe_dump({'network_potential': net_potential['baryir_config']}, sort_keys=False,
                             default_flow_style=None))
    return 0


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """A subcommand's ``--debug`` (the top-level flag keeps its value when the subcommand's is absent)."""
    parser.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                        help='show the traceback of an error (also: BARYIR_DEBUG=1)')


def build_parser() -> argparse.ArgumentParser:
    from baryir_plugin.data.checks import ToolParser

    parser = ToolParser(prog='baryir', description='BaryIR for BasicSR.')
    parser.add_argument('--version', action='store_true', help='print versions and exit')
    parser.add_argument('--debug', action='store_true', help='show the traceback of an error (also: BARYIR_DEBUG=1)')
    sub = parser.add_subparsers(dest='command')
    for kind in PIPELINES:
        sub.add_parser(kind, add_help=False, help=f"BasicSR's {kind} pipeline (same flags as `basicsr {kind}`)")
    conv = sub.add_parser('convert-official', help="convert the authors' release checkpoint to BasicSR .pth files")
    conv.add_argument('input', help='official checkpoint (torch.save of {"epoch", "BaryIR", "Pots"}, or DA-RCOT\'s '
                                     '{"epoch", "Tnet", "Fnet"})')
    conv.add_argument('output', help='output .pth for network_g ({"params": ...})')
    conv.add_argument('--potentials-out', default=None,
                      help='output .pth for the potentials (default: OUTPUT with _potential before the suffix)')
    conv.add_argument('--no-potentials', action='store_true', help='do not write the potentials')
    conv.add_argument('--overwrite', action='store_true', help='replace output files that exist')
    add_debug_flag(conv)
    conv.set_defaults(func=_convert_official)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``baryir`` console script and of ``python -m baryir_plugin``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PIPELINES:
        return guarded_pipeline(argv[0], argv[1:])
    parser = build_parser()
    parsed = []
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    command = next((a for a in argv if not a.startswith('-')), None)
    prog = f'baryir {command}' if command in commands else 'baryir'  # a flag's error names its command
    status = run_guarded(prog, lambda: parsed.append(parser.parse_args(argv)), debug=debug_requested(argv))
    if status:
        return status
    args = parsed[0]
    if args.version:
        return basicsr_main(['--version'])
    if args.command is None:
        parser.print_help()
        return 2
    return run_guarded(f'baryir {args.command}', lambda: args.func(args), debug=args.debug or debug_requested())


if __name__ == '__main__':
    sys.exit(main())
