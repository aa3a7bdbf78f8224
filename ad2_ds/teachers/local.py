"""A frozen Hugging Face model in this process: ``teacher = LocalTeacher(model); out = teacher(batch)``.

The model is put in eval mode with ``requires_grad=False`` and run under ``torch.no_grad()`` (not
``inference_mode``: its outputs become loss targets next to student tensors that require grad, and inference
tensors cannot be saved for backward).
"""

from typing import Dict, Mapping, Optional

import torch

from ..modeling import accepted_inputs
from ..modeling import model_inputs as modeling_inputs
from .base import Teacher, TeacherOutput, teacher_inputs


def model_inputs(batch: Mapping[str, torch.Tensor], accepted: frozenset, device=None) -> Dict[str, torch.Tensor]:
    """:func:`teacher_inputs` restricted to what the model's forward accepts (DistilBERT/MPNet have no
    token_type_ids), moved to ``device``."""
    inputs = modeling_inputs(teacher_inputs(batch), accepted)
    if device is not None:
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs


def check_attn_implementation(model: torch.nn.Module, output_attentions: bool) -> None:
    """Attention maps need eager attention: sdpa/flash return none (transformers only warns)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if output_attentions and impl not in (None, "eager"):
        raise ValueError(
            f"output_attentions=True needs eager attention, but the teacher uses attn_implementation={impl!r}, which "
            'returns no attention maps: load it with attn_implementation="eager"'
        )


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class LocalTeacher(Teacher):
    """A frozen HF model for sequence classification run in this process.

    dtype/device: move the model there first (None: leave it). Logits come back in fp32; hidden states and
    attentions in the model's dtype.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        check_attn_implementation(model, output_attentions)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = freeze(model)
        self.device = device if device is not None else next(model.parameters()).device
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.num_labels = model.config.num_labels
        self.hidden_size = getattr(model.config, "hidden_size", None)
        self._accepted = accepted_inputs(model)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherOutput:
        out = self.model(
            **model_inputs(batch, self._accepted, self.device),
            output_hidden_states=self.output_hidden_states,
            output_attentions=self.output_attentions,
            return_dict=True,
        )
        return TeacherOutput(
            logits=out.logits.float(),
            hidden_states=list(out.hidden_states) if self.output_hidden_states else None,
            attentions=list(out.attentions) if self.output_attentions else None,
        )
