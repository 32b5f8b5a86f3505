"""The barycenter framework on any U-Net backbone: the registered barycenter map, the backbone interface,
the default network unchanged, the PromptIR reconstruction and NAFNet, trained through `basicsr train`."""
from __future__ import annotations

import copy
import hashlib
import io
import re

import pytest
import torch
import yaml
from basicsr.archs import build_network

from baryir_plugin.archs import BACKBONE_REGISTRY, BaryIR, BarycenterMap, UNetBackbone
from baryir_plugin.archs.backbones import NAFNetBackbone, PromptIRBackbone, RestormerBackbone
from baryir_plugin.archs.backbones.restormer import RELEASE_INIT_ORDER

from .conftest import OPTIONS, REPO, bin_path, run

SMALL = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
SMALL_PROMPTIR = {'type': 'PromptIRBackbone', **SMALL, 'prompt_dims': [8, 16, 32], 'prompt_sizes': [8, 4, 4]}
SMALL_NAFNET = {'type': 'NAFNetBackbone', 'width': 8, 'enc_blk_nums': [1, 1, 1, 1], 'middle_blk_num': 1,
                'dec_blk_nums': [1, 1, 1, 1]}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- sizes at the default configs -------------------------------------------------------------------
def test_parameter_counts_of_every_backbone_at_its_default_config():
    assert _count(BaryIR()) == 53_549_774  # the released network (reference minus its unused modules)
    promptir = BaryIR(backbone={'type': 'PromptIRBackbone'})
    # = 53,549,774 + prompts 3,484,975 + the fusion blocks widened by the prompts 8,230,934
    assert _count(promptir) == 65_265_683
    assert sum(_count(promptir.get_submodule(f'prompt{i}')) for i in (1, 2, 3)) == 3_484_975
    del promptir
    assert _count(BaryIR(backbone={'type': 'PromptIRBackbone'}, num_bary_blocks=2)) == 54_487_847  # journal's T depth
    # without T the PromptIR backbone is PromptIR's used parameters (its release has 215,296 more, unused)
    assert _count(BaryIR(backbone={'type': 'PromptIRBackbone'}, embedding_mode='original')) == 35_377_735
    assert _count(NAFNetBackbone()) == 29_159_715  # NAFNet-width32 alone
    nafnet = BaryIR(backbone={'type': 'NAFNetBackbone'})
    assert _count(nafnet) == 64_858_739 and _count(nafnet.bary_map) == 25_435_600


# -- the default network keeps its behaviour ---------------------------------------------------------
def test_default_network_keeps_the_release_keys_order_and_initial_weights():
    torch.manual_seed(0)
    net = BaryIR(**SMALL, heads=[1, 2, 4, 8], num_bary_blocks=1)
    # the same seed gives the same initial weights as the network's release layout always has
    assert _digest(net) == '94448b6131916c2a'
    assert [name for name, _ in net.named_children()] == list(RELEASE_INIT_ORDER)
    assert isinstance(net.backbone, RestormerBackbone) and 'backbone' not in dict(net.named_children())
    keys = list(net.state_dict())
    assert keys[0] == 'embed.weight' and not any(k.startswith('backbone.') for k in keys)
    assert {'residual_decoder.up3.conv.weight', 'decoder3_tail.attn.temperature', 'fuse_block.norm1.weight'} <= set(keys)
    torch.manual_seed(0)
    original = BaryIR(**SMALL, num_bary_blocks=1, embedding_mode='original')
    assert _digest(original) == '9f711ab9f3d74115'


def test_prompt_levels_empty_is_the_restormer_backbone_exactly():
    torch.manual_seed(3)
    plain = BaryIR(**SMALL, num_bary_blocks=1)
    torch.manual_seed(3)
    empty = BaryIR(backbone={'type': 'PromptIRBackbone', **SMALL, 'prompt_levels': []}, num_bary_blocks=1)
    a, b = plain.state_dict(), empty.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 29, 35)
    assert torch.equal(plain(x), empty(x))
    torch.manual_seed(3)
    prompted = BaryIR(backbone=SMALL_PROMPTIR, num_bary_blocks=1)
    assert not torch.equal(plain(x), prompted(x)) and 'prompt3.prompt_param' in prompted.state_dict()


def test_promptir_prompts_sit_where_the_reconstruction_says():
    net = BaryIR(backbone=SMALL_PROMPTIR, num_bary_blocks=1)
    d = 8
    assert net.fuse_block.norm1.weight.shape == (16 * d + 32,)  # [zB, s, p3]
    assert net.decoder3_tail.norm1.weight.shape == (4 * d + 16,) and net.decoder3_proj.weight.shape[:2] == (4 * d, 4 * d + 16)
    assert net.decoder2_tail.norm1.weight.shape == (2 * d + 8,) and net.decoder2_proj.weight.shape[:2] == (2 * d, 2 * d + 8)
    assert net.prompt3.linear_layer.in_features == 8 * d and net.prompt1.linear_layer.in_features == 2 * d
    seen = {}
    for level in (1, 2, 3):
        getattr(net, f'prompt{level}').register_forward_hook(lambda m, i, o, level=level: seen.__setitem__(level, o.shape))
    net(torch.rand(1, 3, 40, 24))
    assert seen == {3: (1, 32, 5, 3), 2: (1, 16, 10, 6), 1: (1, 8, 20, 12)}
    only_latent = BaryIR(backbone={**SMALL_PROMPTIR, 'prompt_levels': [3], 'prompt_source': 'residual'}, num_bary_blocks=1)
    assert not hasattr(only_latent, 'prompt1') and only_latent.decoder3_tail.norm1.weight.shape == (4 * d,)
    only_latent(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="prompt_source='bary' needs"):
        BaryIR(backbone={**SMALL_PROMPTIR, 'prompt_source': 'bary'}, embedding_mode='original')(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match='prompt_levels must be distinct entries'):
        PromptIRBackbone(prompt_levels=[4])


@pytest.mark.parametrize('backbone', [None, SMALL_PROMPTIR, SMALL_NAFNET], ids=['restormer', 'promptir', 'nafnet'])
def test_every_backbone_restores_any_size_and_trains_end_to_end(backbone):
    torch.manual_seed(0)
    net = BaryIR(**SMALL, num_bary_blocks=1) if backbone is None else BaryIR(backbone=backbone, num_bary_blocks=1)
    stride = net.latent_stride
    assert stride == (8 if backbone is None or backbone['type'] == 'PromptIRBackbone' else 16)
    for shape in [(2, 3, 37, 50), (1, 3, 5, 7)]:
        x = torch.rand(*shape)
        out, z, z_bary, residual = net(x, return_latents=True)
        assert out.shape == x.shape
        side = (-(-shape[2] // stride), -(-shape[3] // stride))
        assert z.shape == (shape[0], net.latent_channels, *side) and torch.allclose(residual, z - z_bary)
    (out.square().mean() + z_bary.square().mean()).backward()
    for part in ('bary_map', 'fuse_block', 'residual_decoder'):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(net, part).parameters()), part
    # a state dict round trip, a deep copy (EMA) and a pickle keep the backbone and its modules one
    twin = BaryIR(**SMALL, num_bary_blocks=1) if backbone is None else BaryIR(backbone=backbone, num_bary_blocks=1)
    twin.load_state_dict(net.state_dict())
    x = torch.rand(1, 3, 32, 32)
    net.eval(), twin.eval()
    assert torch.equal(net(x), twin(x))
    ema = copy.deepcopy(net)
    assert next(ema.backbone.children()) is next(ema.children()) and torch.equal(ema(x), net(x))
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), net(x))
    net.train()
    assert net.backbone.training and all(m.training for m in net.modules())


def test_nafnet_backbone_is_nafnet():
    bb = NAFNetBackbone(width=8, enc_blk_nums=[1, 2], middle_blk_num=1, dec_blk_nums=[1, 1])
    assert bb.skip_channels == (8, 16) and bb.latent_channels == 32 and bb.latent_stride == 4
    # NAFNet's names, so its own weights load into the backbone's part
    keys = set(bb.state_dict())
    assert {'intro.weight', 'encoders.1.1.conv2.weight', 'downs.0.weight', 'middle_blks.0.sca.1.weight', 'ups.0.0.weight',
            'decoders.1.0.beta', 'ending.bias', 'encoders.0.0.norm1.bias'} <= keys
    # zero-initialised block scales: every block starts as the identity, as in NAFNet
    x = torch.rand(1, 8, 8, 8)
    assert torch.equal(bb.encoders[0](x), x)


def test_barycenter_map_is_registered_and_works_on_any_latent():
    t = build_network({'type': 'BarycenterMap', 'dim': 32, 'map_type': 'mlp', 'num_blocks': 2})
    assert isinstance(t, BarycenterMap) and t(torch.rand(3, 32, 5, 9)).shape == (3, 32, 5, 9)
    for map_type in ('transformer', 'conv', 'vit'):
        assert BarycenterMap(16, map_type, 1, 4)(torch.rand(1, 16, 3, 4)).shape == (1, 16, 3, 4)
    with pytest.raises(ValueError, match=r'expects latents of shape \(B, 32, h, w\)'):
        t(torch.rand(1, 16, 4, 4))
    # BaryIR takes T as a section of its own, with the latent width filled in
    torch.manual_seed(1)
    a = BaryIR(**SMALL, bary_map={'type': 'BarycenterMap', 'map_type': 'mlp', 'num_blocks': 2})
    torch.manual_seed(1)
    b = BaryIR(**SMALL, bary_map_type='mlp')
    assert a.bary_map.dim == 64 and _count(a) == _count(b)
    with pytest.raises(ValueError, match='either as bary_map'):
        BaryIR(**SMALL, bary_map={'type': 'BarycenterMap'}, num_bary_blocks=2)
    with pytest.raises(ValueError, match="bary_map.type: no arch 'BarycenterMapp'.*did you mean 'BarycenterMap'"):
        BaryIR(**SMALL, bary_map={'type': 'BarycenterMapp'})


def test_backbones_that_break_the_interface_are_refused_by_name():
    with pytest.raises(ValueError, match="no backbone 'NAFNet'.*did you mean 'NAFNetBackbone'"):
        BaryIR(backbone={'type': 'NAFNet'})
    with pytest.raises(ValueError, match='set the backbone\'s own options inside it'):
        BaryIR(dim=16, backbone=SMALL_NAFNET)

    class Clashing(UNetBackbone):
        def __init__(self):
            super().__init__()
            self.latent_channels, self.skip_channels, self.decoder_channels = 8, (4,), 8
            self.bary_map = torch.nn.Conv2d(3, 4, 1)

        def encode(self, x):
            raise AssertionError

        def decode(self, features, skips, x):
            raise AssertionError

    class Incomplete(UNetBackbone):
        def __init__(self):
            super().__init__()
            self.latent_channels, self.skip_channels, self.decoder_channels = 8, (4,), 8

    for cls in (Clashing, Incomplete):
        BACKBONE_REGISTRY.register(cls)
    try:
        with pytest.raises(ValueError, match="module name 'bary_map' is taken by the barycenter framework"):
            BaryIR(backbone={'type': 'Clashing'})
        with pytest.raises(ValueError, match=r'does not implement encode\(\)'):
            BaryIR(backbone={'type': 'Incomplete'})
    finally:
        for name in ('Clashing', 'Incomplete'):
            BACKBONE_REGISTRY._obj_map.pop(name)


def test_plugin_framework_doc_example_runs():
    """docs/plugin-framework.md's complete example, run as written."""
    text = (REPO / 'docs' / 'plugin-framework.md').read_text()
    blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
    assert blocks, 'docs/plugin-framework.md has no python example'
    scope: dict = {}
    try:
        exec(compile(blocks[0], 'docs/plugin-framework.md', 'exec'), scope)  # noqa: S102 (our own doc)
    finally:
        BACKBONE_REGISTRY._obj_map.pop('TinyUNet', None)
    assert scope['restored'].shape == scope['image'].shape


# -- BaryIRModel trains every backbone through `basicsr train`, and resumes ---------------------------
@pytest.mark.parametrize('backbone', [SMALL_PROMPTIR, SMALL_NAFNET], ids=['promptir', 'nafnet'])
def test_each_backbone_trains_with_baryirmodel_and_resumes(backbone, workdir):
    opt = yaml.safe_load((OPTIONS / 'train_baryir_model.yml').read_text())
    opt['name'] = f'backbone_{backbone["type"]}'
    opt['network_g'] = {'type': 'BaryIR', 'num_bary_blocks': 1, 'backbone': backbone}
    del opt['network_potential']['in_channels']  # follows network_g's latent (and its stride)
    opt['train']['total_iter'] = 4
    path = workdir / 'train.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    basicsr = bin_path('basicsr')
    run([basicsr, 'train', '-opt', str(path)], cwd=workdir, env={'OMP_NUM_THREADS': '1'})
    exp = workdir / 'experiments' / opt['name']
    saved = torch.load(exp / 'models' / 'net_potential_4.pth', weights_only=True)
    latent = BaryIR(backbone=backbone, num_bary_blocks=1).latent_channels
    assert saved['params']['conv_weight'].shape[1] == latent
    assert saved['baryir_config']['in_channels'] == latent
    g = torch.load(exp / 'models' / 'net_g_4.pth', weights_only=True)
    assert g['baryir_config']['backbone'] == backbone and 'bary_map.blocks.0.attn.temperature' in g['params']
    run([basicsr, 'train', '-opt', str(path), '--auto_resume', '--force_yml', 'train:total_iter=6'],
        cwd=workdir, env={'OMP_NUM_THREADS': '1'})
    log = '\n'.join(p.read_text() for p in sorted(exp.glob('train_*.log')))
    assert 'Resuming training from epoch: 0, iter: 4.' in log and re.search(r'iter:\s+6,', log)
    assert (exp / 'training_states' / '6.state').is_file()


def test_bad_backbone_options_are_one_line_before_training(workdir):
    opt = yaml.safe_load((OPTIONS / 'train_baryir_model.yml').read_text())
    opt['network_g'] = {'type': 'BaryIR', 'backbone': {**SMALL_NAFNET, 'widht': 8}}
    path = workdir / 'bad.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    import subprocess
    proc = subprocess.run([bin_path('basicsr'), 'train', '-opt', str(path)], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert "network_g.backbone.widht is not an option of NAFNetBackbone (network_g.backbone) (did you mean 'width'?)" \
        in proc.stderr
    opt['network_g'] = {'type': 'BaryIR', 'backbone': {**SMALL_NAFNET}}
    opt['network_potential']['in_channels'] = 64
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    proc = subprocess.run([bin_path('basicsr'), 'train', '-opt', str(path)], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'network_potential.in_channels is 64 but network_g\'s barycenter latent has 128 channels' in proc.stderr
