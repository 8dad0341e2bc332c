"""Answer-only training rows for Olive's LoRA pass: an Olive pre-process component.

Olive's text pre-processing trains on every token of a row. ftl's workflow names this module as
the data config's ``user_script`` and ``ftl_answer_only`` as its pre-process, so the loss covers
the answers only (the prompt's labels are -100), as in the qscale method. Loaded by Olive, in
Olive's process, from the prepared JSONL ({"text", "prompt"} per row).
"""

from __future__ import annotations

from olive.data.registry import Registry


@Registry.register_pre_process()
def ftl_answer_only(dataset, model_name: str, answer_only: bool = True, trust_remote_code=None, **kwargs):
    import torch
    from transformers import AutoTokenizer

    from ftl.quant.qscale import tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    rows = tokenize_records(tokenizer, [dataset[i] for i in range(len(dataset))], answer_only)
    examples = []
    for ids, start in zip(rows.ids, rows.prompt_lengths):
        labels = torch.tensor(ids)
        labels[:start] = -100
        examples.append({"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                         "labels": labels})
    return examples
