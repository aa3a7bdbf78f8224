"""Decoder LLMs fine-tuned as classifiers (Llama-, Qwen2-, Mistral-style ``*ForSequenceClassification``) as teachers::

    tok_t = AutoTokenizer.from_pretrained(path)
    prepare_decoder_teacher(tok_t, teacher_config)   # right padding, a pad token, the same pad id in the config
    teacher = DeepSpeedTeacher.from_pretrained(path, tp_size=2, pad_token_id=tok_t.pad_token_id)

A decoder classifier scores the last token that is not the pad token (transformers'
``GenericForSequenceClassification`` takes the rightmost position whose id differs from ``config.pad_token_id``). Two
things must hold for a padded batch to give each example the logits it gets alone:

- **right padding.** With causal attention a real token never sees a pad to its right, and position ids start at 0 for
  every row. Left padding shifts the positions of a shorter row (these models take positions from the cache, not from
  the mask), so its logits change with the length of its batch-mates.
- **a pad id the model knows.** Many decoder tokenizers have no pad token (Llama); without ``config.pad_token_id`` the
  model refuses batches of more than one row. The eos token serves as pad, as transformers' own examples do.

The student keeps its own tokenizer: the batch carries the teacher's tokenization under ``teacher_*`` keys.
"""

from typing import Optional

import torch


def is_decoder_classifier(model_or_class) -> bool:
    """True for transformers' decoder classifiers, which pool the last non-pad token."""
    from transformers.modeling_layers import GenericForSequenceClassification

    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return issubclass(cls, GenericForSequenceClassification)


def prepare_decoder_teacher(tokenizer, config=None) -> int:
    """Make a decoder teacher's tokenizer pad on the right with a pad token (eos when it has none), and write that
    pad id into ``config.pad_token_id`` when it has none. Returns the pad id. Raises when the config already names
    another pad id than the tokenizer's (the model would pool the wrong token)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("decoder teacher: its tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    pad = int(tokenizer.pad_token_id)
    if config is not None:
        have: Optional[int] = getattr(config, "pad_token_id", None)
        if have is None:
            config.pad_token_id = pad
        elif int(have) != pad:
            raise ValueError(
                f"decoder teacher: its config has pad_token_id={have} but its tokenizer pads with {pad}; the model "
                "pools the last token that is not config.pad_token_id, so they must agree"
            )
    return pad


def check_decoder_padding(attention_mask: Optional[torch.Tensor]) -> None:
    """Raise when a decoder classifier's batch has left-padded rows (a row whose mask starts with 0)."""
    if attention_mask is None:
        return
    if bool((attention_mask[:, 0] == 0).any()):
        raise ValueError(
            "decoder teacher: a left-padded batch (attention_mask starts with 0); decoder classifiers need right "
            "padding (prepare_decoder_teacher(tokenizer) sets it)"
        )


def pools_last_token(config) -> bool:
    """True when the classifier ``config`` describes (its ``architectures``) pools the last real token (decoder
    classifiers) rather than the first ([CLS]-style encoders)."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None and is_decoder_classifier(cls):
            return True
    return False


def pooled_state(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], last: bool) -> torch.Tensor:
    """The sentence state a classifier pools from ``hidden`` [B, T, H]: position 0, or (``last``) each row's last
    real token under a right-padded ``attention_mask`` [B, T]. Returns [B, H]."""
    if not last:
        return hidden[:, 0]
    if attention_mask is None:
        return hidden[:, -1]
    pos = attention_mask.to(hidden.device).long().sum(1).clamp_min(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
