"""The SFT loss with the output head applied only where a label is trained.

A causal LM's head projects every position onto the vocabulary (49,152 columns for SmolLM2), then
the loss drops the positions whose label is -100: prompts, system text and padding. Projecting only
the trained positions gives the same loss and gradients at a fraction of the head's compute, and
it never holds the batch x length x vocabulary logits, their log-softmax and their gradient: the
largest tensors of a LoRA step. On CUDA, Liger Kernel's fused linear cross-entropy does the same
in chunks (`liger_kernel: true`, run.liger_kernel_applies); this path serves CPU and CUDA without it.

It calls the decoder and the head directly, so it is used only where that is the whole forward:
a plain model or a PEFT model whose adapters sit inside the layers (not prompt learning), in one
process (DDP and DeepSpeed wrap the forward; FSDP2 shards the model in place and needs its root
forward), with no logit scaling or soft-capping.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from transformers import Trainer

from training.data.processor import IGNORE

# Config attributes of models whose logits are transformed after the head (Gemma, Cohere, Granite).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_and_head(model):
    """(decoder, head) of a model this loss can run directly, else None."""
    if isinstance(model, FSDPModule) or (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return None  # FSDP2 shards in place, and its root forward must run; other ranks wrap it too
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        if any(c.is_prompt_learning or getattr(c, "is_adaption_prompt", False) for c in peft_config.values()):
            return None
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, k, None) not in (None, 1, 1.0) for k in LOGIT_TRANSFORMS):
        return None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return decoder, head


def trained_token_loss(decoder, head, inputs: dict, num_items: int | torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy over trained positions, over `num_items` (the accumulated batch's trained
    tokens, as the Trainer counts them) or, without it, their mean: what the model's own loss returns."""
    labels = inputs["labels"]
    hidden = decoder(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep]).float()
    if num_items is None:
        return F.cross_entropy(logits, targets[keep], reduction="mean")
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(logits.device)
    return F.cross_entropy(logits, targets[keep], reduction="sum") / num_items


class TrainedTokensTrainer(Trainer):
    """The HF Trainer with the head run on trained positions only, where decoder_and_head allows."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        own_loss = model.training and not return_outputs and "labels" in inputs and not self.args.use_liger_kernel \
            and self.label_smoother is None and self.compute_loss_func is None \
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)  # their engines own the forward
        parts = decoder_and_head(model) if own_loss else None
        if parts is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        num_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        return trained_token_loss(*parts, inputs, num_items)
