"""The one teacher interface: ``out = teacher(batch)`` returns a :class:`TeacherOutput`.

Implementations (local HF model, DeepSpeed tensor-parallel inference, on-disk cache, streamed producer) all take the
same batch dict the student sees. When teacher and student use different tokenizers, the batch carries the teacher's
own tokenization under ``teacher_``-prefixed keys (``teacher_input_ids``, ``teacher_attention_mask``, ...);
:func:`teacher_inputs` picks the right keys.
"""

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import torch

from ..batch import MODEL_INPUT_KEYS, TEACHER_PREFIX  # noqa: F401  (re-exported)


@dataclass
class TeacherOutput:
    """What the AD2 objective needs from a teacher.

    logits: [B, C] (C=1 for regression).
    hidden_states: per layer, index 0 = embedding output, each [B, T, H_t]; entries may be None for layers that were
        not kept (a cache stores only the layers a layer map asks for). None when not requested.
    attentions: per layer (index 0 = first transformer layer), each [B, heads, T, T] probabilities, or None.
    """

    logits: torch.Tensor
    hidden_states: Optional[Sequence[Optional[torch.Tensor]]] = None
    attentions: Optional[Sequence[Optional[torch.Tensor]]] = None

    def to(self, device=None, dtype=None) -> "TeacherOutput":
        def move(x):
            if x is None:
                return None
            x = x.to(device) if device is not None else x
            return x.to(dtype) if dtype is not None and x.is_floating_point() else x

        return TeacherOutput(
            logits=move(self.logits),
            hidden_states=None if self.hidden_states is None else [move(h) for h in self.hidden_states],
            attentions=None if self.attentions is None else [move(a) for a in self.attentions],
        )


def teacher_inputs(batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The model inputs the teacher should see: ``teacher_*`` keys when present, else the student's keys."""
    if TEACHER_PREFIX + "input_ids" in batch:
        return {k: batch[TEACHER_PREFIX + k] for k in MODEL_INPUT_KEYS if TEACHER_PREFIX + k in batch}
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


class Teacher:
    """Base class: subclasses implement ``__call__(batch) -> TeacherOutput``.

    ``output_hidden_states`` / ``output_attentions`` say what the objective needs; an implementation that cannot
    provide them raises ``ValueError`` at construction, not mid-run.
    """

    num_labels: int
    output_hidden_states: bool = False
    output_attentions: bool = False

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> TeacherOutput:  # pragma: no cover - interface
        raise NotImplementedError
