"""Trainer callbacks: metrics to our loggers, and a progress bar that leaves the lines to them."""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class QuietProgress(ProgressCallback):
    """The stock tqdm bar, without its dict dump on every log (ConsoleLogger prints those)."""

    def on_evaluate(self, args, state, control, **kwargs):
        self._t = time.time()  # eval and checkpoint time is not training throughput

    on_save = on_evaluate

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class MetricsCallback(TrainerCallback):
    def __init__(self, tracker):
        self.tracker = tracker
        self._t = self._tokens = self._step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t, self._tokens, self._step = time.time(), state.num_input_tokens_seen, state.global_step

    def on_evaluate(self, args, state, control, **kwargs):
        self._t = time.time()  # eval and checkpoint time is not training throughput

    on_save = on_evaluate

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "loss" in metrics and self._t is not None:
            now = time.time()
            steps = max(1, state.global_step - self._step)
            metrics["tokens_per_s"] = (state.num_input_tokens_seen - self._tokens) / max(now - self._t, 1e-9)
            metrics["s_per_step"] = (now - self._t) / steps
            self._t, self._tokens, self._step = now, state.num_input_tokens_seen, state.global_step
        if metrics:
            self.tracker.log(metrics, state.global_step)
