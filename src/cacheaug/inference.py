"""Inference of :class:`~cacheaug.model.CacheAugmentedLM`: ``augment`` (the coprocessor once at the end of a prompt),
the primitives serving uses (``compute_latents[_batch]``, ``insert_latents[_rows]``, ``decode``, ``next_position``),
``generate``, and the gate's decisions (cacheaug.gate). A mixin: the model class holds the state and the input checks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import kv
from .sampling import SamplingParams, next_token


@dataclass
class AugmentOutput:
    """Result of :meth:`CacheAugmentedLM.augment`.

    Attributes:
        cache: a ``DynamicCache`` holding the prompt's K/V followed by the latents' K/V; the unmodified base
            model continues from it with its default positions.
        logits: ``[B, V]`` next-token logits after the latents (they predict the token after the prompt).
        latents: ``[B, N_L, D]`` the latent embeddings that were inserted.
        prompt_length: number of prompt tokens P (the cache holds P + N_L entries, + 1 with ``reread_last``).
        next_position: rotary position of the next token to decode from ``cache`` (pass it as ``position_ids``, or
            use :meth:`CacheAugmentedLM.decode`); equal to the cache length under the default "shifted" scheme.
        inserted: False when the gate (``CacheAugmentedLM.gate``) said no: then ``cache`` holds the prompt alone,
            ``logits`` are the frozen model's and ``latents`` is None.
    """

    cache: DynamicCache
    logits: torch.Tensor
    latents: torch.Tensor | None
    prompt_length: int
    next_position: int = -1
    inserted: bool = True


class Inference:
    """The inference API and the gate's decisions."""

    # ------------------------------------------------------------------ the gate (cacheaug.gate)
    def gated(self, use_gate: bool | None = None) -> bool:
        """Whether the gate decides (``use_gate`` None: whenever a gate is loaded)."""
        if use_gate and self.gate is None:
            raise ValueError(
                "this coprocessor has no gate: fit one with `cacheaug train-gate --checkpoint CKPT --data "
                "...`, or augment without it"
            )
        return self.gate is not None and use_gate is not False

    @torch.no_grad()
    def gate_states(self, input_ids: torch.Tensor, positions) -> torch.Tensor:
        """The frozen decoder's last hidden states at ``positions`` ``[K]`` or ``[B, K]`` of ``input_ids`` ``[B, T]``:
        ``[B, K, D]``, what the gate reads there (the same states ``augment`` reads at a prompt's last token)."""
        ids = self._check_ids(input_ids, "input_ids")
        positions = torch.as_tensor(positions, device=self.device).long()
        if positions.dim() == 1:
            positions = positions[None].expand(ids.shape[0], -1)
        h, _ = self._prefix_pass(ids)
        return h.gather(1, positions[:, :, None].expand(-1, -1, h.shape[-1]))

    @torch.no_grad()
    def gate_probs(self, input_ids: torch.Tensor, positions) -> torch.Tensor:
        """``[B, K]`` the gate's probability that augmenting after each of ``positions`` pays (needs a gate)."""
        self.gated(True)
        return self.gate(self.gate_states(input_ids, positions))

    @torch.no_grad()
    def last_state(self, cache: DynamicCache, last_token: torch.Tensor) -> torch.Tensor:
        """The frozen decoder's last hidden state ``[B, D]`` at the last of the P positions of a prompt's ``cache`` (the
        gate's input), from one decoder call on that token (``last_token`` ``[B]``) over the first P - 1; ``cache`` is
        left as it is."""
        P = kv.length(cache)
        position = torch.full((last_token.shape[0], 1), P - 1, device=self.device)
        return self.base.get_decoder()(
            input_ids=last_token.view(-1, 1).to(self.device),
            position_ids=position,
            **self.cache_kwargs(kv.fork(cache, P - 1)),
        ).last_hidden_state[:, -1]

    def gate_fires(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[...]`` bool: the gate's decision for the decoder's last hidden states ``hidden`` ``[..., D]``."""
        return self.gate.fires(hidden, self.gate_threshold)

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen LM head (with the family's final soft-cap) on hidden states ``[B, D]``: next-token logits."""
        logits = self.base.get_output_embeddings()(hidden[:, None])[:, 0]  # [B, 1, D]: as the model's own last row
        cap = self.family.final_logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    # ------------------------------------------------------------------ inference
    def _check_cache(self, cache, prompt_len: int, batch: int) -> DynamicCache:
        cfg = self.base.config
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != cfg.num_hidden_layers:
            raise ValueError(
                f"`past_key_values` must be a transformers Cache with {cfg.num_hidden_layers} layers for this model, "
                f"got {type(cache).__name__} with {None if layers is None else len(layers)} layers."
            )
        for i, layer in enumerate(layers):
            k = getattr(layer, "keys", None)
            if k is None or k.dim() != 4 or k.shape[0] != batch or k.shape[2] != prompt_len:
                raise ValueError(
                    f"`past_key_values` layer {i} does not hold the prompt's {prompt_len} positions for batch {batch} "
                    f"(keys {None if k is None else tuple(k.shape)}). Pass the cache of exactly this prompt, built "
                    "with DynamicCache() without a config so sliding-window layers keep every token."
                )
            expected_heads = getattr(cfg, "num_key_value_heads", None)
            if expected_heads is not None and k.shape[1] != expected_heads:
                raise ValueError(
                    f"`past_key_values` layer {i} has {k.shape[1]} kv heads but this model has {expected_heads}: "
                    "the cache belongs to another model."
                )
            if k.device != self.device:
                raise ValueError(f"`past_key_values` is on {k.device}, the model on {self.device}.")
        return kv.fork(cache)

    @torch.no_grad()
    def compute_latents(
        self, cache: DynamicCache, length: int | None = None, last_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The coprocessor's latents ``[B, N_L, D]`` for the first ``length`` positions of a decoder ``cache``
        (all of them by default). The cache is only read; latents can be computed ahead or on another worker
        and inserted later with :meth:`insert_latents`. ``last_token`` ``[B]``: the id of the token at position
        ``length - 1`` (needed with ``echo_residual``)."""
        self._require_coprocessor("compute_latents")
        prefix_kv = kv.layers(kv.fork(cache, length))
        echo = None
        if self.config.echo_residual:
            if last_token is None:
                raise ValueError(
                    "This coprocessor (echo_residual) needs `last_token`, the id of the prefix's last token."
                )
            echo = self.base.get_input_embeddings()(torch.as_tensor(last_token, device=self.device).view(-1, 1))
        return self.coprocessor(prefix_kv, prefix_kv[0][0].shape[0], echo=echo)  # default positions: length..

    @torch.no_grad()
    def compute_latents_batch(
        self,
        prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]],
        lengths: list[int],
        last_tokens: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """The latents of several prefixes (each a batch-1 cache's ``(keys, values)`` per layer, ``lengths``
        positions) in one coprocessor call, left-padded and masked: one ``[1, N_L, D]`` each, equal to
        :meth:`compute_latents` on each prefix alone. ``last_tokens``: each prefix's last token id (needed with
        ``echo_residual``)."""
        self._require_coprocessor("compute_latents_batch")
        n_latents = self.config.n_latents
        padded, mask = kv.left_pad(prefixes, lengths, n_latents)
        positions = torch.tensor(lengths, device=self.device)[:, None] + torch.arange(n_latents, device=self.device)
        echo = None
        if self.config.echo_residual:
            if last_tokens is None:
                raise ValueError("This coprocessor (echo_residual) needs `last_tokens`, each prefix's last token id.")
            echo = self.base.get_input_embeddings()(torch.tensor(last_tokens, device=self.device)[:, None])
        latents = self.coprocessor(padded, len(prefixes), 1, positions, mask, echo)  # [B, N_L, D]
        return [latents[i : i + 1] for i in range(len(prefixes))]

    def next_position(self, cache_length: int, augmented: bool = True) -> int:
        """Rotary position of the next token decoded from a cache of ``cache_length`` entries (augmented or not)."""
        return cache_length - (self.config.position_shift if augmented else 0)

    def decode(self, cache: DynamicCache, input_ids: torch.Tensor, position: int, **kwargs):
        """The frozen decoder over ``input_ids`` ``[B, n]`` continuing ``cache``, the first at rotary ``position``
        (:meth:`next_position`; e.g. ``AugmentOutput.next_position``). Returns the base model's output."""
        n = input_ids.shape[1]
        pos = torch.arange(position, position + n, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        return self.base(input_ids=input_ids, position_ids=pos, **self.cache_kwargs(cache), **kwargs)

    @torch.no_grad()
    def insert_latents(
        self,
        cache: DynamicCache,
        latents: torch.Tensor,
        last_token: torch.Tensor | None = None,
        then: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ``latents`` to ``cache`` (which holds exactly the prompt, P entries) through the frozen decoder;
        returns the next-token logits ``[B, V]``. ``last_token`` ``[B]``: the prompt's last token id, read again
        after the latents with ``reread_last``. ``then`` ``[B, n]``: tokens to decode after the latents in the same
        pass (a late insertion's replay: one decoder call instead of two); the logits are then those after the last
        of them."""
        x, P = self._insertion_inputs(latents, last_token, then), cache.get_seq_length()
        pos = None
        if self.config.position_scheme != "shifted":  # the default positions (the cache's own) are the shifted ones
            n = 0 if then is None else then.shape[1]
            pos = torch.tensor([self._insertion_positions(P, latents.shape[1], n)], device=self.device)
            pos = pos.expand(x.shape[0], -1)
        out = self.base(inputs_embeds=x, position_ids=pos, logits_to_keep=1, **self.cache_kwargs(cache))
        return out.logits[:, -1]

    @torch.no_grad()
    def insert_latents_rows(
        self,
        caches: list[DynamicCache],
        latents: torch.Tensor,
        last_tokens: torch.Tensor | None = None,
        then: torch.Tensor | None = None,
    ) -> tuple[list[DynamicCache], torch.Tensor]:
        """:meth:`insert_latents` for several prompts of different lengths in one decoder call (serving: the requests
        whose latents arrived together). ``caches``: one batch-1 cache per row, each holding exactly its prompt (left
        unchanged); ``latents`` ``[G, N_L, D]``; ``last_tokens`` ``[G]``; ``then`` ``[G, n]`` (the same number of
        tokens replayed in every row). The caches are left-padded to the longest, which keeps every row's
        query-to-key distances (sliding windows mask as unbatched), and each row is at its own positions. Returns one
        new cache per row (its prompt, the latents, then its tokens) and the next-token logits ``[G, V]``."""
        if len(caches) != latents.shape[0]:
            raise ValueError(f"{len(caches)} caches for {latents.shape[0]} rows of latents")
        x = self._insertion_inputs(latents, last_tokens, then)
        lengths, m = [kv.length(c) for c in caches], x.shape[1]
        n = 0 if then is None else then.shape[1]
        padded, mask = kv.left_pad([kv.layers(c) for c in caches], lengths, m)
        batch = kv.from_layers(padded)
        pos = torch.tensor([self._insertion_positions(P, latents.shape[1], n) for P in lengths], device=self.device)
        out = self.base(
            inputs_embeds=x, position_ids=pos, attention_mask=mask, logits_to_keep=1, **self.cache_kwargs(batch)
        )
        return kv.unpad_rows(batch, [P + m for P in lengths]), out.logits[:, -1]

    def _insertion_inputs(self, latents: torch.Tensor, last_token, then) -> torch.Tensor:
        """The decoder's input embeddings for an insertion: the latents, the prompt's last token again with
        ``reread_last``, then the tokens replayed (``then``)."""
        embed = self.base.get_input_embeddings()
        x, B = latents.to(embed.weight.dtype), latents.shape[0]
        if self.config.reread_last:
            if last_token is None:
                raise ValueError(
                    "This coprocessor (reread_last) needs `last_token`, the id of the prompt's last token."
                )
            token = torch.as_tensor(last_token, device=self.device).view(-1, 1).expand(B, 1)
            x = torch.cat([x, embed(token)], dim=1)
        if then is not None and then.shape[1]:
            x = torch.cat([x, embed(then.to(self.device))], dim=1)
        return x

    def _insertion_positions(self, P: int, n_latents: int, n: int) -> list[int]:
        """Rotary positions of an insertion's inputs after a prompt of ``P`` tokens: ``n_latents`` latents, the
        reread token, ``n`` replayed tokens."""
        cfg = self.config
        m = n_latents + int(cfg.reread_last) + n
        if cfg.position_scheme == "shifted":  # everything at its cache index
            return list(range(P, P + m))
        lat = [P - 1] * n_latents if cfg.position_scheme == "shared" else list(range(P, P + n_latents))
        start = self.next_position(P + cfg.n_inserted)  # token p = P - 1 keeps its position; the text goes on here
        return lat + [P - 1] * int(cfg.reread_last) + list(range(start, start + n))

    @torch.no_grad()
    def augment(
        self, prompt_ids: torch.Tensor, past_key_values=None, *, stale_by: int = 0, use_gate: bool | None = None
    ) -> AugmentOutput:
        """Run the coprocessor once at the end of ``prompt_ids`` ``[B, P]`` and insert its latents.

        Args:
            prompt_ids: the prompt (no padding; equal lengths across the batch).
            past_key_values: optionally the decoder's cache of exactly this prompt (e.g. stored offline);
                it is not modified.
            stale_by: compute the latents from the first P - stale_by tokens only, as if they had been
                computed that many tokens earlier and arrived late (the staleness study; asynchronous serving).
                They are still inserted after the whole prompt.
            use_gate: let the gate (``self.gate``, fitted by ``cacheaug train-gate``) decide whether to insert;
                None (default): whenever there is one. Where it says no, the output is the frozen model's
                (``inserted=False``); a batch whose rows it decides differently is refused (augment them apart, or
                use :meth:`generate`, which splits them).

        Returns an :class:`AugmentOutput` whose ``cache`` (prompt + latents) the unmodified base model decodes
        from, the next token at rotary position ``next_position`` (with the default "shifted" scheme that is the
        cache length, i.e. plain HF decoding with default positions).
        """
        ids = self._check_ids(prompt_ids, "prompt_ids")
        self._check_dtypes()
        B, P = ids.shape
        if not isinstance(stale_by, int) or not 0 <= stale_by < P:
            raise ValueError(
                f"`stale_by` must be an integer in [0, {P - 1}] for a prompt of {P} tokens, got {stale_by!r}."
            )
        self._check_context(
            P - 1 + self.config.n_inserted, f"A prompt of {P} tokens with {self.config.n_latents} latents"
        )
        if past_key_values is None:
            cache = DynamicCache()
            h = self.base.get_decoder()(input_ids=ids, **self.cache_kwargs(cache)).last_hidden_state[:, -1]
        else:
            cache = self._check_cache(past_key_values, P, B)
            h = None
        if self.gated(use_gate):
            if h is None:  # the state at the prompt's last token, from the stored cache
                h = self.last_state(cache, ids[:, -1])
            fire = self.gate_fires(h)
            if not fire.any():
                return AugmentOutput(
                    cache=cache,
                    logits=self._head_logits(h),
                    latents=None,
                    prompt_length=P,
                    next_position=P,
                    inserted=False,
                )
            if not fire.all():
                raise ValueError(
                    f"the gate augments rows {fire.nonzero()[:, 0].tolist()} of this batch and not the "
                    "others: augment the rows apart, or use generate(), which splits them"
                )
        latents = self.compute_latents(cache, P - stale_by, ids[:, P - 1 - stale_by])  # [B, N_L, D]
        logits = self.insert_latents(cache, latents, ids[:, P - 1])
        return AugmentOutput(
            cache=cache,
            logits=logits,
            latents=latents,
            prompt_length=P,
            next_position=self.next_position(cache.get_seq_length()),
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int = 32,
        *,
        augment: bool = True,
        use_gate: bool | None = None,
        deliberate: str = "once",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode ``max_new_tokens`` after ``prompt_ids`` ``[B, P]``; returns ``[B, P + new]`` like HF ``generate``.

        With ``augment=True`` the coprocessor runs once at the end of the prompt and the base model decodes
        from the augmented cache. With ``augment=False``, ``enabled = False``, or when the coprocessor raises
        (a warning says so), this is exactly ``base.generate``. With a gate (``self.gate``; ``use_gate`` None: whenever
        there is one) each row is augmented only where the gate fires at its prompt's end; the other rows are
        exactly ``base.generate`` (rows of a batch the gate decides differently are decoded apart and padded, as
        ``base.generate`` pads rows that ended early).

        ``deliberate="every"`` runs the coprocessor before every new token instead of once: the latents of the text
        so far go in after it, the next token is chosen from them, and the token joins the text alone (the cache
        keeps only text, so each step is one trace of the training pass: what ``--insertion answer`` trains). With a
        gate, it decides at each step and row (frozen logits where it says no).
        """
        if deliberate not in ("once", "every"):
            raise ValueError(f"`deliberate` must be 'once' or 'every', got {deliberate!r}.")
        ids = self._check_ids(prompt_ids, "prompt_ids")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
        gen = self.base.generation_config
        eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
        pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
        hf_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            hf_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_token_id is not None:
            hf_kwargs["eos_token_id"] = eos_token_id
        if pad_token_id is not None:
            hf_kwargs["pad_token_id"] = pad_token_id
        if not augment or not self.enabled:
            return self.base.generate(ids, **hf_kwargs)
        if deliberate == "every":
            params = SamplingParams(max(temperature, 1e-5), top_k, top_p) if do_sample else SamplingParams()
            return self._generate_deliberating(ids, max_new_tokens, params, eos, pad, generator, self.gated(use_gate))
        if self.gated(use_gate):
            with torch.no_grad():
                fire = self.gate_fires(self.base.get_decoder()(input_ids=ids).last_hidden_state[:, -1])
            if not fire.any():
                return self.base.generate(ids, **hf_kwargs)
            if not fire.all():
                kw = dict(
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    generator=generator,
                )
                parts = {
                    True: self.generate(ids[fire], use_gate=False, **kw),
                    False: self.base.generate(ids[~fire], **hf_kwargs),
                }
                width = max(t.shape[1] for t in parts.values())
                fill = pad if pad is not None else (eos if isinstance(eos, int) else (list(eos or [0]) or [0])[0])
                out = torch.full((ids.shape[0], width), int(fill), dtype=ids.dtype, device=ids.device)
                for flag, t in parts.items():
                    out[(fire if flag else ~fire).nonzero()[:, 0], : t.shape[1]] = t
                return out
        self._check_context(ids.shape[1] + self.config.n_inserted + max_new_tokens - 1, "Generation")
        try:
            aug = self.augment(ids, use_gate=False)
        except Exception as err:  # the decoder must keep working when the coprocessor fails
            warnings.warn(
                f"Coprocessor failed ({type(err).__name__}: {err}); decoding without augmentation.", stacklevel=2
            )
            return self.base.generate(ids, **hf_kwargs)

        eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=ids.device)
        if pad is None:
            pad = int(eos_ids[0]) if len(eos_ids) else 0
        params = SamplingParams(max(temperature, 1e-5), top_k, top_p) if do_sample else SamplingParams()
        logits, cache, position = aug.logits, aug.cache, aug.next_position
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new = []
        for step in range(max_new_tokens):
            token = next_token(logits, params, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new.append(token)
            finished |= torch.isin(token, eos_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = self.decode(cache, token[:, None], position + step, logits_to_keep=1).logits[:, -1]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1)

    @torch.no_grad()
    def _generate_deliberating(self, ids, max_new_tokens: int, params, eos, pad, generator, gated: bool):
        """``generate(..., deliberate="every")``: before each token the coprocessor reads the text-only cache and its
        latents go into a fork of it; the chosen token then extends the text-only cache."""
        B = ids.shape[0]
        self._check_context(ids.shape[1] + max_new_tokens - 1 + self.config.n_inserted, "Generation")
        eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=ids.device)
        if pad is None:
            pad = int(eos_ids[0]) if len(eos_ids) else 0
        decoder = self.base.get_decoder()
        cache = DynamicCache()
        h = decoder(input_ids=ids, **self.cache_kwargs(cache)).last_hidden_state[:, -1]
        last = ids[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        new = []
        for step in range(max_new_tokens):
            P = ids.shape[1] + step
            fire = self.gate_fires(h) if gated else torch.ones(B, dtype=torch.bool, device=ids.device)
            logits = self._head_logits(h)
            if fire.any():
                latents = self.compute_latents(cache, P, last)
                augmented = self.insert_latents(kv.fork(cache), latents, last)
                logits = torch.where(fire[:, None], augmented.to(logits.dtype), logits)
            token = next_token(logits, params, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new.append(token)
            finished |= torch.isin(token, eos_ids)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            position = torch.full((B, 1), P, device=ids.device)
            h = decoder(input_ids=token[:, None], position_ids=position, **self.cache_kwargs(cache)).last_hidden_state
            h, last = h[:, -1], token
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1)
