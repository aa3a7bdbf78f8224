"""The batch convention every part shares: ``batch = {"input_ids", "attention_mask", ["token_type_ids"], "labels",
"idx"}``, plus the teacher's own tokenization under ``teacher_``-prefixed keys when its tokenizer differs."""

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
TEACHER_PREFIX = "teacher_"
