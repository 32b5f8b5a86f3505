"""Validation and test-time evaluation of BaryIRModel: BasicSR's validation lines plus per-image reports,
the inputs' own scores, the average over evaluation sets, and metrics that cannot be computed.

:class:`BaryIRValidation` is a mixin of BasicSR models (BaryIRModel inherits it before SRModel); it reads
its options from ``self.val_options`` (:class:`~baryir_plugin.models.options.BaryIRValOptions`).
"""
from __future__ import annotations

import math
import os.path as osp
import time
import warnings
from typing import Optional, Sequence

from basicsr.metrics import calculate_metric
from basicsr.utils import get_root_logger, imwrite, tensor2img

from baryir_plugin.errors import OptionError

from .options import BaryIRValOptions
from .validation_report import SetAverage, ValidationReport, metric_needs_reference

# Metrics that are undefined on images with a side shorter than this (after crop_border): BasicSR's SSIM
# keeps only the pixels where its 11x11 window fits (fewer gives the mean of nothing: NaN), NIQE scores
# 96x96 blocks (fewer: an error deep inside torch).
MIN_SIDE = {'calculate_ssim': (11, 'its 11x11 window'), 'calculate_ssim_pt': (11, 'its 11x11 window'),
            'calculate_niqe': (96, 'its 96x96 blocks')}


def score_image(data: dict, metric_opt: dict) -> tuple[Optional[float], Optional[str]]:
    """One metric on one image as BasicSR computes it: (value, None), or (None, why it has no value) for an
    image the metric is not defined on or a result that is not a finite number (never NaN or inf)."""
    metric_type = metric_opt.get('type')
    img = data['img']
    height, width = img.shape[:2]
    crop = metric_opt.get('crop_border') or 0
    crop = crop if isinstance(crop, int) and crop > 0 else 0
    need = MIN_SIDE.get(metric_type)
    if need is not None and min(height, width) - 2 * crop < need[0]:
        size = f'{max(height - 2 * crop, 0)}x{max(width - 2 * crop, 0)}'
        where = f' after crop_border {crop}' if crop else ''
        return None, (f'{metric_type} needs at least {need[0]}x{need[0]} pixels ({need[1]}){where}; this image has '
                      f'{size}')
    with warnings.catch_warnings():  # e.g. numpy's 'Mean of empty slice': the value itself says it
        warnings.simplefilter('ignore', RuntimeWarning)
        value = float(calculate_metric(data, metric_opt))
    if math.isfinite(value):
        return value, None
    if value == math.inf and metric_type in ('calculate_psnr', 'calculate_psnr_pt'):
        return None, f'{metric_type} is inf: the image equals its reference'
    return None, f'{metric_type} gave {value} on this {height}x{width} image'


class BaryIRValidation:
    """``nondist_validation`` with per-image reports, for a BasicSR model with ``val_options``."""

    val_options: BaryIRValOptions
    set_average: Optional[SetAverage]
    # sets without ground truth are scored with no-reference metrics; full-reference ones are reported
    # unavailable there (BasicSR's SRModel cannot validate such a set at all)
    validates_without_gt = True

    @staticmethod
    def _set_average(opt: dict, is_train: bool) -> Optional[SetAverage]:
        """The ``val.average`` option: which evaluation sets the logged average is taken over."""
        names = []
        for key, entry in (opt.get('datasets') or {}).items():
            # training validates the 'val' entries; `basicsr test` evaluates every entry
            if not is_train or entry.get('phase', key.split('_')[0]) == 'val':
                names.append(entry.get('name'))
        names = list(dict.fromkeys(names))  # two entries of one name report (and average) as one set
        choice = BaryIRValOptions.from_opt(opt.get('val'), is_train).average
        if choice is None:
            choice = len(names) >= 2
        if choice is False:
            return None
        if choice is True:
            chosen = names
        else:
            unknown = [n for n in choice if n not in names]
            if unknown:
                raise OptionError(f'val.average: {unknown} are not evaluation sets of this file ({names}); '
                                  'list dataset names, or write true (all sets) or false (no average).')
            chosen = list(dict.fromkeys(choice))
        if 'average' in names:
            raise OptionError("a dataset is named 'average', the name the average over sets is logged and "
                              'reported under; rename the dataset, or set val.average: false.')
        return SetAverage(chosen) if chosen else None

    @staticmethod
    def _dataset_metrics(dataset_opt: dict, metric_names: Sequence[str]) -> list[str]:
        """The val.metrics names a dataset entry asks for (its ``metrics`` list; default all of them)."""
        only = dataset_opt.get('metrics')
        if only is None:
            return list(metric_names)
        if not isinstance(only, (list, tuple)) or not all(isinstance(m, str) for m in only):
            raise OptionError(f'dataset {dataset_opt.get("name")}: metrics must be a list of names of val.metrics '
                              f'({list(metric_names)}), got {only!r}.')
        unknown = [m for m in only if m not in metric_names]
        if unknown:
            raise OptionError(f'dataset {dataset_opt.get("name")}: metrics {unknown} are not defined under '
                              f'val.metrics ({list(metric_names)}); define them there or drop them from the dataset '
                              'entry.')
        return list(only)

    # ------------------------------------------------------------------------------------------------
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """BasicSR's validation plus a per-image report (``val`` options):

        report: write ``<set>.csv`` (one row per image) and ``<set>.json`` (means, the number of images
            each is over, the metric options that produced them, unavailable metrics and why, seconds per
            image) to ``results/<name>/metrics/`` (test) or ``experiments/<name>/metrics/<set>_<iter>``
            (training). Default: on in test, off in training.
        channels_last: (test mode) run the network in channels-last memory format, 1.5-1.8x faster on a
            CPU for the same output (to 1e-5; scripts/bench_inference.py). Default false.
        self_ensemble: restore with the mean over the 8 rotations and flips of the input (8 forwards per
            image, one at a time, so 8x the time at the memory of one; usually a higher PSNR). Applies to
            validation during training too. Default false.
        input_metrics: also score the degraded input (``input_<metric>`` columns: against the ground truth,
            or on its own for no-reference metrics; the baseline a restoration must beat). Default false.
        average: after the last set of a round, log each metric's mean over the sets' means (the "Average"
            column of all-in-one tables; with best value, TensorBoard tag ``metrics/average/<metric>``,
            the inputs' average with input_metrics, and ``average[_<iter>].json`` beside the set reports).
            A metric is averaged over the sets that report it, named in the log when not all do.
            true: all evaluation sets; a list: those dataset names; false: none. Default: true when there
            are two sets or more.
        metrics: as BasicSR. A dataset entry may list ``metrics: [psnr, niqe]`` (names of val.metrics,
            checked when the model is built) to compute only those on that set, e.g. no-reference metrics
            only where they are wanted. Full-reference metrics on a set without ground truth and metrics
            whose local weight files are missing are reported as unavailable (never as a number);
            no-reference metrics (calculate_niqe, calculate_piqe) need ``better: lower`` for the
            best-value tracking. A metric that has no value for one image (SSIM on an image smaller
            than its 11x11 window, any NaN or inf) is unavailable for that image, with the reason, in
            the report and in one warning per set; the set's mean is over the images that have it.
        """
        options = self.val_options
        dataset_name = dataloader.dataset.opt['name']
        all_metrics = options.metrics
        metric_opts = {m: all_metrics[m] for m in self._dataset_metrics(dataloader.dataset.opt, list(all_metrics))}
        report = ValidationReport(dataset_name, metric_opts, with_input=options.input_metrics)
        logger = get_root_logger()
        for val_data in dataloader:
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            start = time.perf_counter()
            self.test()
            seconds = time.perf_counter() - start
            visuals = self.get_current_visuals()
            restored = tensor2img([visuals['result']])
            gt = tensor2img([visuals['gt']]) if 'gt' in visuals else None
            lq = tensor2img([visuals['lq']]) if report.with_input else None
            for attr in ('lq', 'gt', 'output'):
                if hasattr(self, attr):
                    delattr(self, attr)
            if save_img:
                imwrite(restored, self._visualization_path(dataset_name, img_name, current_iter))
            values, input_values, missing = {}, {}, {}
            for name, opt_ in metric_opts.items():
                if not report.available(name):
                    continue
                if gt is None and metric_needs_reference(opt_):
                    report.mark_unavailable(name, f'{opt_.get("type")} needs ground truth; {dataset_name} has none')
                    continue
                data = {'img': restored} if gt is None else {'img': restored, 'img2': gt}
                try:
                    value, reason = score_image(data, opt_)
                except FileNotFoundError as e:  # e.g. LPIPS without its local weight files
                    report.mark_unavailable(name, str(e))
                    logger.warning(f'Validation {dataset_name}: metric {name} unavailable: {e}')
                    continue
                if value is None:
                    missing[name] = reason
                else:
                    values[name] = value
                if lq is not None:  # the degraded input scored the same way (no-reference metrics: on its own)
                    data['img'] = lq
                    value, reason = score_image(data, opt_)
                    if value is None:
                        missing[f'input_{name}'] = reason
                    else:
                        input_values[name] = value
            report.add(img_name, values, input_values, seconds, missing=missing)

        self.metric_results = means = report.means()
        input_means = report.means('input_') if report.with_input else {}
        if metric_opts:
            self._log_means(dataset_name, means, input_means, current_iter, tb_logger)
        for name, reason in report.unavailable.items():
            logger.info(f'Validation {dataset_name}: {name} not reported ({reason}).')
        partial = report.missing_summary()
        if partial:
            logger.warning(f'Validation {dataset_name}: {partial}')
        if options.report:
            folder, stem = self._report_location(dataset_name, current_iter)
            csv_path, json_path = report.write(folder, stem, **self._report_extra(current_iter))
            logger.info(f'Validation {dataset_name}: per-image metrics in {csv_path}, summary in {json_path}')
        if self.set_average is not None and self.set_average.add(current_iter, dataset_name, means, input_means):
            self._log_set_average(current_iter, tb_logger, options.report)

    def _log_means(self, label: str, means: dict, input_means: dict, current_iter, tb_logger) -> None:
        """BasicSR's validation lines for ``label`` (means, best values, TensorBoard), then its inputs' means."""
        self.metric_results = means  # what BasicSR's _log_validation_metric_values reads
        self._initialize_best_metric_results(label)
        for name, value in means.items():
            self._update_best_metric_result(label, name, value, current_iter)
        self._log_validation_metric_values(current_iter, label, tb_logger)
        if input_means:
            get_root_logger().info(f'Inputs of {label}: ' + ', '.join(f'{k}: {v:.4f}' for k, v in input_means.items()))

    def _log_set_average(self, current_iter, tb_logger, write_report: bool) -> None:
        """Log (and report) the mean over the ``val.average`` sets, once the last of them has reported."""
        average, logger = self.set_average, get_root_logger()
        means = average.means()
        if not means:
            return
        partial = ''.join(f'; {metric} over {len(sets)} of them ({", ".join(sets)})'
                          for metric, (_, sets) in means.items() if len(sets) < len(average.names))
        logger.info(f'Validation average: mean of the set means of {", ".join(average.names)}{partial}')
        inputs = {metric: value for metric, (value, _) in average.input_means().items()}
        self._log_means('average', {metric: value for metric, (value, _) in means.items()}, inputs,
                        current_iter, tb_logger)
        if write_report:
            folder, stem = self._report_location('average', current_iter)
            path = average.write(osp.join(folder, f'{stem}.json'), **self._report_extra(current_iter))
            logger.info(f'Validation average: summary in {path}')

    def _report_location(self, dataset_name: str, current_iter) -> tuple[str, str]:
        if self.opt['is_train']:
            return osp.join(self.opt['path']['experiments_root'], 'metrics'), f'{dataset_name}_{current_iter}'
        return osp.join(self.opt['path']['results_root'], 'metrics'), dataset_name

    def _report_extra(self, current_iter) -> dict:
        return {'model': self.opt['name'], 'iteration': current_iter,
                'network_g': self.opt['path'].get('pretrain_network_g')}

    def _visualization_path(self, dataset_name: str, img_name: str, current_iter) -> str:
        if self.opt['is_train']:
            return osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
        suffix = self.val_options.suffix or self.opt['name']
        return osp.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')
