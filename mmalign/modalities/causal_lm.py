"""Answer-only token log-likelihood for transformers causal LMs (`CausalLMLikelihood`).

    logp(y | x) = Σ_t mask_t · log softmax(logits_{t-1})[y_t]        (METHODS.md §2)

over the answer tokens only: prompt and padding contribute nothing. Chosen and
rejected answers go through ONE concatenated forward (2B rows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.data.preference import batch_fields, flatten
from mmalign.errors import DataError
from mmalign.modalities.lm_head import (LogitTransform, captured_hidden, check_head, chunked_token_logps,
                                        language_model, logit_transform)
from mmalign.modalities.fast_paths import verified_once
from mmalign.modalities.packing import Packed, check_packing, pack_rows
from mmalign.types import Draw, LogpOutput, PreferenceBatch


def selective_log_softmax(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels] without a full float32 (B, T, V) copy.

    logits: (B, T, V); labels: (B, T) -> (B, T) in float32.
    For float32 logits, gather minus logsumexp keeps only (B, T) results. For half
    precision, rows are upcast one at a time (a (T, V) float32 buffer at most).
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row = row_logits.float().log_softmax(-1)
        rows.append(row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def log_square_mass(logits: Tensor) -> Tensor:
    """log sum_v softmax(logits)_v^2 = logsumexp(2 logits) - 2 logsumexp(logits), detached.

    logits: (B, T, V) -> (B, T) float32; rows are upcast one at a time."""
    with torch.no_grad():
        rows = [torch.logsumexp(2 * r.float(), -1) - 2 * torch.logsumexp(r.float(), -1) for r in logits]
        return torch.stack(rows)


class CausalLMLikelihood:
    """Tokenises (prompt, response) items and scores the response under a causal LM.

    tokenizer: a transformers tokenizer (its `padding_side` is honoured: left or right).
    max_length: prompt + response tokens. Responses are truncated to fit; a prompt
        that leaves no room for a response is an error naming the example.
    chat_template: wrap the prompt with the tokenizer's chat template (a list-of-messages
        prompt always uses it).
    lm_head_chunk: answer tokens per LM-head chunk (`model.lm_head_chunk`; 0: full logits).
    padding_free: run the batch as one packed row (`data.padding_free`).
    """

    deterministic = True  # no randomness: a precomputed reference is exact
    square_mass = False  # TokenSquareMass: also return token_log_sq_mass (WPO), set by the trainer

    def __init__(self, tokenizer: Any, max_length: int = 512, max_prompt_length: int = 0,
                 chat_template: bool = False, lm_head_chunk: int = 0, padding_free: bool = False) -> None:
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.chat_template = chat_template
        self.lm_head_chunk = lm_head_chunk
        self.padding_free = padding_free
        self.checked: dict[int, tuple[bool, bool]] = {}  # id(model) -> (packing, chunked head) verified
        self.transform = LogitTransform()

    # -- tokenisation -------------------------------------------------------
    def _prompt_ids(self, prompt: Any) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list) or self.chat_template:
            if getattr(tok, "chat_template", None) is None:
                raise DataError("a chat prompt needs a tokenizer with a chat template (or set data.chat_template: false)")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False).input_ids
        return tok(prompt, add_special_tokens=True).input_ids

    def _response_ids(self, response: Any) -> list[int]:
        if isinstance(response, list):  # [{"role": "assistant", "content": ...}]
            response = "".join(m["content"] for m in response)
        ids = self.tokenizer(response, add_special_tokens=False).input_ids
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def encode(self, item: dict[str, Any]) -> tuple[list[int], int]:
        """Token ids of prompt + response, and the number of prompt tokens."""
        prompt = self._prompt_ids(item["prompt"])
        where = f"example {item.get('_index', '?')}"
        if self.max_prompt_length and len(prompt) > self.max_prompt_length:
            raise DataError(f"{where}: prompt has {len(prompt)} tokens > data.max_prompt_length={self.max_prompt_length}")
        if len(prompt) >= self.max_length:
            raise DataError(f"{where}: prompt has {len(prompt)} tokens, leaving no room for the answer "
                            f"within data.max_length={self.max_length}")
        response = self._response_ids(item["response"])[: self.max_length - len(prompt)]
        return prompt + response, len(prompt)

    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        """records -> batch of N items (2B for pairs: chosen rows first).

        inputs: input_ids, attention_mask, loss_mask (1 on response tokens), position_ids, all (N, T).
        """
        encoded = [self.encode(item) for item in flatten(records, kind)]
        width = max(len(ids) for ids, _ in encoded)
        left = self.tokenizer.padding_side == "left"
        n = len(encoded)
        input_ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        loss_mask = torch.zeros((n, width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(encoded):
            start = width - len(ids) if left else 0
            input_ids[row, start : start + len(ids)] = torch.tensor(ids)
            attention_mask[row, start : start + len(ids)] = 1
            loss_mask[row, start + n_prompt : start + len(ids)] = 1
        # Positions count real tokens only, so left and right padding give the same logits.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "loss_mask": loss_mask, "position_ids": position_ids}
        return batch_fields(records, kind, inputs)

    def record_length(self, record: dict[str, Any], kind: str) -> int:
        """Tokens of the record's longest row in `collate` (mmalign.types.MeasuresLength)."""
        from mmalign.modalities.lengths import text_record_length

        return text_record_length(self, record, kind)

    # -- the contract (mmalign.types.Likelihood, TokenValues) -------------------
    def to(self, device: torch.device | str) -> "CausalLMLikelihood":
        """Nothing to move: the tokenizer is all it owns."""
        return self

    def scored_token_ids(self, batch: PreferenceBatch, width: int) -> Tensor:
        """(N, width) ids scored by the last `width` columns of `token_logps` (labels are input_ids[:, 1:])."""
        return batch.inputs["input_ids"][:, -width:]

    def draw(self, batch: PreferenceBatch, generator: torch.Generator | None = None) -> Draw:
        return Draw()

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw | None = None) -> LogpOutput:
        """Sum of response-token log-probs per item: logps (N,), tokens (N,), token_logps (N, T-1).

        With `lm_head_chunk` > 0 (and a head `check_head` accepts) the answer tokens go through
        the head in chunks (`lm_head.chunked_token_logps`): no (N, T, V) logits. With
        `padding_free` the N rows run as one packed row (`packing.pack_rows`): no padding."""
        x = batch.inputs
        inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "position_ids": x["position_ids"]}
        labels = x["input_ids"][:, 1:]
        mask = x["loss_mask"][:, 1:].to(torch.float32)
        packed, chunked = self.paths(model, inputs)
        if packed is not None:
            inputs = {"input_ids": packed.ids, "position_ids": packed.position_ids}  # no mask: block-diagonal
        if chunked:
            with captured_hidden(model) as (capture, head):
                model(**inputs, use_cache=False)
            hidden = capture.hidden if packed is None else packed.unpack(capture.hidden)
            token_logps, square = chunked_token_logps(hidden[:, :-1], head, labels, mask, self.lm_head_chunk,
                                                      self.transform, self.square_mass)
        else:
            logits = model(**inputs, use_cache=False).logits
            logits = logits if packed is None else packed.unpack(logits)
            token_logps = selective_log_softmax(logits[:, :-1], labels) * mask
            square = log_square_mass(logits[:, :-1]) * mask if self.square_mass else None
        return LogpOutput(logps=token_logps.sum(-1), tokens=mask.sum(-1),
                          token_logps=token_logps, token_mask=mask, token_log_sq_mass=square)

    def paths(self, model: torch.nn.Module, inputs: dict[str, Tensor]) -> tuple[Packed | None, bool]:
        """(the packed row or None, chunked head or not) for `model`: `padding_free` and
        `lm_head_chunk` > 0 as configured, each verified once per model (`check_packing`,
        `check_head`; a model that fails a check uses the padded / full-logits path)."""
        def verify() -> tuple[bool, bool]:
            self.transform = logit_transform(language_model(model).config)
            packing = self.padding_free and check_packing(model, inputs["input_ids"], inputs["attention_mask"])
            return packing, self.lm_head_chunk > 0 and check_head(model, inputs, self.transform)

        packing, head = verified_once(self.checked, id(language_model(model)), verify)
        return (pack_rows(inputs["input_ids"], inputs["attention_mask"]) if packing else None), head


def build(cfg: Any) -> tuple[torch.nn.Module, CausalLMLikelihood, Any]:
    """Load model and tokenizer from the local directory `cfg.model.path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmalign.config import resolve_path

    path = resolve_path(cfg.model.path)
    dtype = getattr(torch, cfg.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    likelihood = CausalLMLikelihood(tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.chat_template,
                                    cfg.model.lm_head_chunk, cfg.data.padding_free)
    return model, likelihood, tokenizer
