"""mmalign's pairwise losses, fed by `CausalLMLikelihood`, give the same loss values as
TRL's `DPOTrainer` on the same tiny Llama and batch (shared/METHODS.md §1).

What the installed TRL (1.16) does, read from trl/trainer/dpo_trainer.py, and how the
test accounts for it:

* Tokenisation. For plain-text records TRL appends the EOS *string* to chosen and
  rejected, tokenises `prompt` and `prompt + completion` with the tokenizer's default
  special tokens, and scores the tokens after their common prefix. mmalign tokenises the
  prompt with the default special tokens and the answer alone, then appends the EOS id.
  With the word-level toy tokenizer (no BOS/EOS post-processor, whitespace/punctuation
  pre-tokenizer, "<eos>" a special token) both give the same ids: the test asserts that
  the collated input_ids / attention_mask / completion mask are identical, then that the
  per-sequence logps are, before comparing any loss.
* Per-sequence logps: sum over completion tokens of the fused LM head's log-probs (TRL)
  vs. the summed masked log-softmax (mmalign). The reference comes from the `ref_model`
  forward at every step (`precompute_ref_log_probs=False`, the default).
* Loss reduction: TRL takes `per_sequence_loss.mean()`; mmalign returns (B,) and the
  trainer averages, so we compare `fn(...).mean()`.
* `ipo`: TRL divides each log-ratio by its completion-token count, as mmalign does.
* `sigmoid` IGNORES `label_smoothing` in TRL 1.16 (cDPO was dropped from it; the option is
  documented for `robust` and `exo_pair` only). The cDPO formula survives in TRL's `aot`
  loss, which sorts the batch's log-ratios first; on a one-pair batch that sort is the
  identity, so `cdpo` is compared with `aot` pair by pair.
* `bco_pair` in TRL 1.16 has NO running-mean shift: it is -log σ(β hc) - log σ(-β hr),
  i.e. mmalign's `bco_pair` with delta = 0. mmalign's trainer passes delta = the running
  mean of the rewards (`RunningMean`), which includes the current batch on the first step,
  so on that first step mmalign's trainer and TRL 1.16 differ (pinned below).
* RPO: there is no `rpo_alpha` in TRL 1.16; RPO is `loss_type=["sigmoid", "sft"]` with
  `loss_weights=[1, alpha]`. TRL's `sft` term is the NLL averaged over ALL chosen tokens
  of the batch (token-weighted), while mmalign's `sft_loss` is a per-example token mean,
  averaged over examples. They agree when all chosen answers have the same length (the
  "equal" batch); on a mixed-length batch TRL's term is Σ(-pc)/Σ(nc) (pinned below).
* `exo_pair`, `aot`, `aot_unpaired`, `apo_down`, `discopop`, `sigmoid_norm` (mmalign/losses_trl.py)
  and the f-divergences are compared below on the whole 4-pair batches; `aot*` sort over the
  batch in both. `discopop` computes m exp(-x) as exp(log sigma(x/tau) - x) (finite where TRL's
  exp(-x) overflows), equal up to float rounding here.
* `ld_alpha` (LD-DPO) is compared through `ld_pairs` on the likelihoods' per-token values.
* `use_weighting` (WPO): the likelihood's `token_log_sq_mass` (square_mass on) gives TRL's fused
  LM head's log sum p^2; compared through `wpo_pair_weights`. mmalign's
  `simpo`, `soft`, `kto`, `ranked` have no `DPOTrainer` loss type.

One trainer serves every case: `_compute_loss` reads `loss_types`, `loss_weights`, `beta`
and `label_smoothing` from the trainer's attributes, so the test switches them per case.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402

from mmalign.losses import bco_reward_mean, f_divergence_pairs, get_loss, sft_loss  # noqa: E402
from mmalign.losses_trl import ld_pairs, wpo_pair_weights  # noqa: E402
from mmalign.modalities.causal_lm import CausalLMLikelihood  # noqa: E402
from mmalign.toytext import build_tiny_llama, build_word_tokenizer, make_toy_pairs  # noqa: E402
from mmalign.train.objective import RunningMean  # noqa: E402

BETA = 0.1
EPS = 0.1  # label smoothing / flip rate for robust and cdpo
ALPHA = 0.5  # RPO weight of the SFT term


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # 1e-5 absolute, and 1e-5 relative for the large values (sppo_hard is ~370 here).
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = build_word_tokenizer()
    policy = build_tiny_llama(len(tok), seed=0)
    reference = build_tiny_llama(len(tok), seed=1)
    # A sharper policy (the tied embedding / LM head scaled up) gives log-ratios of several
    # nats, so no loss sits at its zero-margin value.
    with torch.no_grad():
        policy.get_input_embeddings().weight.mul_(4.0)

    pool = make_toy_pairs(64, seed=3)
    mixed = pool[:4]
    equal = [r for r in pool if len(r["chosen"].split()) == 8][:4]  # 3 objects: same chosen length
    assert len({len(r["chosen"].split()) for r in mixed}) > 1, "mixed batch should vary in length"
    assert len(equal) == 4
    # chosen and rejected of different lengths in every pair (LD-DPO's tail, sigmoid_norm's |c| != |r|)
    longer = [r["chosen"] for r in pool if len(r["chosen"].split()) >= 8]
    shorter = [r for r in pool if len(r["chosen"].split()) < 8]
    uneven = [dict(r, rejected=other) for r, other in zip(shorter[:4], longer)]
    assert all(len(r["chosen"].split()) != len(r["rejected"].split()) for r in uneven) and len(uneven) == 4

    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_dpo")), report_to="none", bf16=False, use_cpu=True,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, max_length=None, beta=BETA,
        # the fused LM head then also returns log sum p^2 (WPO); `trl_loss` switches the weighting per case
        use_weighting=True,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(mixed),
        eval_dataset={"mixed": Dataset.from_list(mixed), "equal": Dataset.from_list(equal),
                      "uneven": Dataset.from_list(uneven)},
    )
    policy.eval()
    reference.eval()

    likelihood = CausalLMLikelihood(tok, max_length=64)
    out = SimpleNamespace(trainer=trainer, policy=policy, reference=reference, tok=tok, likelihood=likelihood)
    for name, records in (("mixed", mixed), ("equal", equal), ("uneven", uneven)):
        # The eval dataloader samples sequentially, so the TRL batch keeps the record order.
        trl_batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(name))))
        mm_batch = likelihood.collate(records, "pair")
        with torch.no_grad():
            pol_out, ref_out = likelihood.logps(policy, mm_batch), likelihood.logps(reference, mm_batch)
            pol, ref = pol_out.pairs(), ref_out.pairs()
        setattr(out, name, SimpleNamespace(records=records, trl=trl_batch, mm=mm_batch, pol=pol, ref=ref,
                                           pol_out=pol_out, ref_out=ref_out))
    return out


def trl_loss(trainer, batch, loss_types, loss_weights=None, *, beta=BETA, label_smoothing=0.0,
             f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
             ld_alpha=None, use_weighting=False) -> torch.Tensor:
    """TRL's loss for one batch, without training: `compute_loss` under no_grad, eval mode."""
    saved = (trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing,
             trainer.f_divergence_type, trainer.f_alpha_divergence_coef, trainer.args.discopop_tau, trainer.ld_alpha,
             trainer.use_weighting)
    trainer.loss_types = list(loss_types)
    trainer.loss_weights = list(loss_weights or [1.0] * len(loss_types))
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = f_divergence_type, f_alpha_divergence_coef
    trainer.args.discopop_tau, trainer.ld_alpha, trainer.use_weighting = discopop_tau, ld_alpha, use_weighting
    try:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).detach()
    finally:
        (trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing, trainer.f_divergence_type,
         trainer.f_alpha_divergence_coef, trainer.args.discopop_tau, trainer.ld_alpha, trainer.use_weighting) = saved


# --------------------------------------------------------------------------- inputs first


@pytest.mark.parametrize("which", ["mixed", "equal"])
def test_same_token_ids_and_masks(env, which):
    b = getattr(env, which)
    assert torch.equal(b.trl["input_ids"], b.mm.inputs["input_ids"])
    assert torch.equal(b.trl["attention_mask"], b.mm.inputs["attention_mask"])
    assert torch.equal(b.trl["completion_mask"], b.mm.inputs["loss_mask"])
    # Both append EOS to every answer and add no BOS (the word tokenizer has none).
    eos = env.tok.eos_token_id
    last = b.trl["attention_mask"].sum(-1) - 1
    assert (b.trl["input_ids"].gather(1, last[:, None]).squeeze(1) == eos).all()
    assert (b.trl["input_ids"][:, 0] != env.tok.bos_token_id).all()


@pytest.mark.parametrize("which", ["mixed", "equal"])
def test_same_sequence_logps(env, which):
    b = getattr(env, which)
    tr = env.trainer
    pol_c, pol_r = tr.compute_ref_log_probs(tr.model, b.trl)  # TRL's per-sequence path, any model
    ref_c, ref_r = tr.compute_ref_log_probs(tr.ref_model, b.trl)
    assert_close(pol_c, b.pol.chosen)
    assert_close(pol_r, b.pol.rejected)
    assert_close(ref_c, b.ref.chosen)
    assert_close(ref_r, b.ref.rejected)
    n_c, n_r = b.trl["completion_mask"].sum(-1).chunk(2)
    assert torch.equal(n_c.float(), b.pol.chosen_tokens) and torch.equal(n_r.float(), b.pol.rejected_tokens)
    # The log-ratios are far from zero, so the loss comparisons below are not degenerate.
    assert (b.pol.chosen - b.ref.chosen).abs().min() > 1.0
    assert (b.pol.rejected - b.ref.rejected).abs().min() > 1.0


# --------------------------------------------------------------------------- losses

CASES = [
    # (TRL loss_type, mmalign loss, extra hyperparameters for both, beta)
    ("sigmoid", "dpo", {}, BETA),
    ("robust", "robust", {"label_smoothing": EPS}, BETA),
    ("ipo", "ipo", {}, BETA),
    ("hinge", "hinge", {}, BETA),
    ("hinge", "hinge", {}, 0.5),  # beta*d > 1 for one pair: the clip is exercised
    ("nca_pair", "nca_pair", {}, BETA),
    ("sppo_hard", "sppo_hard", {}, BETA),
    ("apo_zero", "apo_zero", {}, BETA),
    ("bco_pair", "bco_pair", {}, BETA),  # TRL 1.16: no running mean, i.e. delta = 0
]


@pytest.mark.parametrize("which", ["mixed", "equal"])
@pytest.mark.parametrize(("trl_type", "name", "hp", "beta"), CASES,
                         ids=[f"{c[0]}-beta{c[3]}" for c in CASES])
def test_loss_matches_trl(env, which, trl_type, name, hp, beta):
    b = getattr(env, which)
    expected = trl_loss(env.trainer, b.trl, [trl_type], beta=beta, label_smoothing=hp.get("label_smoothing", 0.0))
    kwargs = dict(hp, delta=0.0) if name == "bco_pair" else dict(hp)
    ours = get_loss(name).fn(b.pol, b.ref, beta=beta, **kwargs)
    assert ours.shape == (4,)
    assert_close(ours.mean(), expected)


def test_hinge_clip_is_active(env):
    d = (env.mixed.pol.chosen - env.mixed.ref.chosen) - (env.mixed.pol.rejected - env.mixed.ref.rejected)
    assert (0.5 * d > 1).any() and (0.5 * d < 1).any()


def test_trl_sigmoid_ignores_label_smoothing(env):
    b = env.mixed
    trl = trl_loss(env.trainer, b.trl, ["sigmoid"], label_smoothing=EPS)
    assert_close(get_loss("dpo").fn(b.pol, b.ref, beta=BETA).mean(), trl)
    cdpo = get_loss("cdpo").fn(b.pol, b.ref, beta=BETA, label_smoothing=EPS).mean()
    assert abs(float(cdpo - trl)) > 1e-3


def test_cdpo_matches_trl_aot_on_single_pairs(env):
    b = env.mixed
    ours = get_loss("cdpo").fn(b.pol, b.ref, beta=BETA, label_smoothing=EPS)
    rows = env.trainer.eval_dataset["mixed"]
    for i in range(len(b.records)):
        single = env.trainer._prepare_inputs(env.trainer.data_collator([rows[i]]))
        trl = trl_loss(env.trainer, single, ["aot"], label_smoothing=EPS)
        assert_close(ours[i], trl)


def test_trl_bco_pair_has_no_running_mean(env):
    """mmalign's trainer shifts by delta = RunningMean over the rewards (first step: this
    batch's mean); TRL 1.16 does not. Fails if TRL brings its running mean back."""
    b = env.mixed
    trl = trl_loss(env.trainer, b.trl, ["bco_pair"])
    mean = float(bco_reward_mean(b.pol, b.ref, beta=BETA))
    delta = RunningMean().update(mean, 2 * len(b.records))
    assert math.isclose(delta, mean) and abs(delta) > 0.1
    with_running_mean = get_loss("bco_pair").fn(b.pol, b.ref, beta=BETA, delta=delta).mean()
    assert abs(float(with_running_mean - trl)) > 1e-3


def test_rpo_equal_chosen_lengths(env):
    b = env.equal
    assert b.pol.chosen_tokens.unique().numel() == 1
    trl = trl_loss(env.trainer, b.trl, ["sigmoid", "sft"], [1.0, ALPHA])
    ours = (get_loss("dpo").fn(b.pol, b.ref, beta=BETA) + ALPHA * sft_loss(b.pol)).mean()
    assert_close(ours, trl)


def test_rpo_mixed_lengths_trl_averages_over_tokens(env):
    b = env.mixed
    assert b.pol.chosen_tokens.unique().numel() > 1
    trl = trl_loss(env.trainer, b.trl, ["sigmoid", "sft"], [1.0, ALPHA])
    dpo = get_loss("dpo").fn(b.pol, b.ref, beta=BETA).mean()
    token_weighted = -b.pol.chosen.sum() / b.pol.chosen_tokens.sum()  # TRL: mean over all chosen tokens
    assert_close(dpo + ALPHA * token_weighted, trl)
    per_example = sft_loss(b.pol)  # mmalign: token mean per example, then mean over examples
    assert abs(float(dpo + ALPHA * per_example.mean() - trl)) > 1e-3


# --------------------------------------------------------------------------- TRL's other types, f-divergences

TOL = 1e-6  # the bar: absolute, on values of order 1 (largest here ~5)
NEW_CASES = [
    # (TRL loss_type = mmalign loss, extra hyperparameters for both)
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": EPS}),
    ("aot", {"label_smoothing": 0.0}),
    ("aot", {"label_smoothing": EPS}),
    ("aot_unpaired", {"label_smoothing": EPS}),
    ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.05}),
    ("discopop", {"discopop_tau": 0.5}),
    ("sigmoid_norm", {}),
]


@pytest.mark.parametrize("which", ["mixed", "equal", "uneven"])
@pytest.mark.parametrize(("name", "hp"), NEW_CASES, ids=[f"{c[0]}-{c[1]}" for c in NEW_CASES])
def test_new_loss_matches_trl(env, which, name, hp):
    b = getattr(env, which)
    expected = trl_loss(env.trainer, b.trl, [name], **hp)
    ours = get_loss(name).fn(b.pol, b.ref, beta=BETA, **hp)
    assert ours.shape == (4,)
    assert abs(float(ours.mean()) - float(expected)) < TOL


def test_aot_batch_differs_from_cdpo(env):
    """The sort matters on this batch: aot's entries over 4 pairs are not per-pair cDPO."""
    b = env.mixed
    aot = get_loss("aot").fn(b.pol, b.ref, beta=BETA, label_smoothing=EPS)
    cdpo = get_loss("cdpo").fn(b.pol, b.ref, beta=BETA, label_smoothing=EPS)
    assert float((aot - cdpo).abs().max()) > 1e-2


F_CASES = [
    # (TRL loss_type, mmalign loss, extra hyperparameters)
    ("sigmoid", "dpo", {}),
    ("hinge", "hinge", {}),
    ("ipo", "ipo", {}),
    ("robust", "robust", {"label_smoothing": EPS}),
    ("exo_pair", "exo_pair", {"label_smoothing": 1e-3}),
    ("discopop", "discopop", {"discopop_tau": 0.05}),
    ("sigmoid_norm", "sigmoid_norm", {}),
]
DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.2)]


@pytest.mark.parametrize(("kind", "alpha"), DIVERGENCES, ids=[f"{k}-{a}" for k, a in DIVERGENCES])
@pytest.mark.parametrize(("trl_type", "name", "hp"), F_CASES, ids=[c[0] for c in F_CASES])
def test_f_divergence_matches_trl(env, trl_type, name, hp, kind, alpha):
    b = env.mixed
    expected = trl_loss(env.trainer, b.trl, [trl_type], f_divergence_type=kind, f_alpha_divergence_coef=alpha, **hp)
    ours = get_loss(name).fn(*f_divergence_pairs(b.pol, b.ref, kind, alpha), beta=BETA, **hp)
    if name == "discopop" and torch.isnan(expected):
        # forward_kl turns these log-ratios (down to ~ -9) into scores of ~ -8000: beta delta < -88 and
        # TRL's fp32 exp(-x) overflows, inf * 0 = NaN. mmalign's exp(log sigma(x/tau) - x) stays finite
        # and equals TRL's formula evaluated in float64 (the intended difference).
        assert kind == "forward_kl" and torch.isfinite(ours).all()
        scored, zeros = f_divergence_pairs(b.pol, b.ref, kind, alpha)
        x = BETA * (scored.chosen - scored.rejected).double()
        m = torch.sigmoid(x / hp["discopop_tau"])
        trl64 = -torch.nn.functional.logsigmoid(x) * (1 - m) + torch.exp(-x) * m
        torch.testing.assert_close(ours.double(), trl64, rtol=1e-6, atol=1e-6)
        return
    scale = max(1.0, abs(float(expected)))
    assert abs(float(ours.mean()) - float(expected)) < TOL * scale
    scored, _ = f_divergence_pairs(b.pol, b.ref, kind, alpha)
    assert float((scored.chosen - (b.pol.chosen - b.ref.chosen)).abs().max()) > 0.1  # s(u) is not u here


LD_CASES = [("sigmoid", "dpo", {}, 0.5), ("sigmoid", "dpo", {}, 0.0), ("ipo", "ipo", {}, 0.5),
            ("sigmoid_norm", "sigmoid_norm", {}, 0.3), ("apo_down", "apo_down", {}, 0.5)]


@pytest.mark.parametrize("which", ["mixed", "uneven"])
@pytest.mark.parametrize(("trl_type", "name", "hp", "alpha"), LD_CASES, ids=[f"{c[0]}-{c[3]}" for c in LD_CASES])
def test_ld_alpha_matches_trl(env, which, trl_type, name, hp, alpha):
    b = getattr(env, which)
    assert torch.equal(b.trl["input_ids"], b.mm.inputs["input_ids"])
    assert torch.equal(b.trl["completion_mask"], b.mm.inputs["loss_mask"])
    expected = trl_loss(env.trainer, b.trl, [trl_type], ld_alpha=alpha, **hp)
    pol, ref = ld_pairs(b.pol_out, b.ref_out, alpha)
    ours = get_loss(name).fn(pol, ref, beta=BETA, **hp)
    assert abs(float(ours.mean()) - float(expected)) < TOL * max(1.0, abs(float(expected)))
    if which == "uneven":  # unequal lengths in every pair: the tail weight changes the sequence values
        assert float((pol.chosen - b.pol.chosen).abs().max() + (pol.rejected - b.pol.rejected).abs().max()) > 0.1


WPO_CASES = [("sigmoid", "dpo", {}), ("ipo", "ipo", {}), ("apo_down", "apo_down", {}),
             ("exo_pair", "exo_pair", {"label_smoothing": 1e-3})]


@pytest.mark.parametrize("which", ["mixed", "uneven"])
@pytest.mark.parametrize(("trl_type", "name", "hp"), WPO_CASES, ids=[c[0] for c in WPO_CASES])
def test_wpo_weighting_matches_trl(env, which, trl_type, name, hp):
    b = getattr(env, which)
    expected = trl_loss(env.trainer, b.trl, [trl_type], use_weighting=True, **hp)
    env.likelihood.square_mass = True
    try:
        with torch.no_grad():
            policy_out = env.likelihood.logps(env.policy, b.mm)
    finally:
        env.likelihood.square_mass = False
    weights = wpo_pair_weights(policy_out)
    assert weights.shape == (4,) and float((weights - 1).abs().min()) > 1e-3  # not a no-op
    ours = get_loss(name).fn(b.pol, b.ref, beta=BETA, **hp) * weights
    # the weights are ~1e-4 here (w ~ 0.01 per answer), so the bar is relative: 1e-5
    torch.testing.assert_close(ours.mean(), expected, rtol=1e-5, atol=1e-9)


def test_wpo_with_the_sft_term(env):
    """RPO with WPO: TRL 1.16 means to multiply the broadcast SFT value by each pair's weight, but its
    in-place `per_sequence_loss *= weights` on the expanded SFT tensor raises (a TRL bug). mmalign
    weights its per-example SFT term by the pair's weight; TRL's intent weights the batch's one SFT
    value, which differs (sum_i s_i w_i != S sum_i w_i even at equal lengths): pinned both ways."""
    b = env.equal
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        trl_loss(env.trainer, b.trl, ["sigmoid", "sft"], [1.0, ALPHA], use_weighting=True)
    env.likelihood.square_mass = True
    try:
        with torch.no_grad():
            weights = wpo_pair_weights(env.likelihood.logps(env.policy, b.mm))
    finally:
        env.likelihood.square_mass = False
    ours = ((get_loss("dpo").fn(b.pol, b.ref, beta=BETA) + ALPHA * sft_loss(b.pol)) * weights).mean()
    weighted_sigmoid = trl_loss(env.trainer, b.trl, ["sigmoid"], use_weighting=True)
    expected = weighted_sigmoid + ALPHA * (sft_loss(b.pol) * weights).mean()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-9)
    token_weighted = -b.pol.chosen.sum() / b.pol.chosen_tokens.sum()  # TRL's one SFT value per batch
    trl_intent = weighted_sigmoid + ALPHA * token_weighted * weights.mean()
    assert abs(float(ours - trl_intent)) > 1e-3 * abs(float(ours))


@pytest.mark.parametrize(("trl_types", "weights", "kind"), [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], "reverse_kl"),  # MPO
    (["sigmoid", "sft"], [1.0, ALPHA], "reverse_kl"),  # RPO
    (["hinge", "ipo", "sft"], [0.5, 0.3, 0.7], "js_divergence"),
], ids=["mpo", "rpo", "hinge-ipo-sft-js"])
def test_loss_combinations_match_trl(env, trl_types, weights, kind):
    """On the equal-length batch (where the two SFT conventions agree); bco_pair at delta = 0 as TRL 1.16."""
    from mmalign.losses_combined import combined_spec

    b = env.equal
    expected = trl_loss(env.trainer, b.trl, trl_types, weights, f_divergence_type=kind)
    names = [{"sigmoid": "dpo"}.get(t, t) for t in trl_types]
    spec = combined_spec(names, weights)
    extra = {"delta": 0.0} if "delta" in spec.statistics else {}
    ours = spec.fn(b.pol, b.ref, beta=BETA, f_divergence_type=kind, **extra)
    assert abs(float(ours.mean()) - float(expected)) < TOL * max(1.0, abs(float(expected)))


# --------------------------------------------------------------------------- VLM families
# TRL 1.16's vision collator (DataCollatorForVisionPreference) runs the processor once on the
# left-padded prompts with their images and once on the completions, and scores the completion
# tokens; with text (non-conversational) records the prompt text must already hold the family's
# template and placeholders, and TRL appends no EOS, so the TRL records end their answers with the
# EOS string while mmalign's (same prompt, chat_template off) get the EOS id appended. Same prompt
# lengths in the batch, so TRL's left padding is flushed away and both batches are right-padded.

VLM_FAMILIES = ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm", "llava_onevision"]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_family_same_token_ids_and_logps_as_trl(family, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from vlm_family_fixtures import BUILDERS, prompt

    from mmalign.modalities.llava import LlavaLikelihood
    from mmalign.toyvlm import draw_shape

    model, processor = BUILDERS[family]()
    pairs = [(("red", "circle"), "a red circle", "a blue circle"),
             (("green", "square"), "a green square", "a red square")]
    images = [draw_shape(*shape) for shape, _, _ in pairs]
    text = prompt(family, 1)
    mm_records = [{"images": [im], "prompt": text, "chosen": c, "rejected": r, "_index": i}
                  for i, (im, (_, c, r)) in enumerate(zip(images, pairs))]
    trl_records = [{"images": [im], "prompt": text, "chosen": c + " <eos>", "rejected": r + " <eos>"}
                   for im, (_, c, r) in zip(images, pairs)]
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, max_length=None,
                     per_device_eval_batch_size=2, per_device_train_batch_size=2, beta=BETA)
    trainer = DPOTrainer(model=model, ref_model=BUILDERS[family]()[0], args=args, processing_class=processor,
                         train_dataset=Dataset.from_list(trl_records), eval_dataset=Dataset.from_list(trl_records))
    model.eval()
    trl_batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    lik = LlavaLikelihood(processor, model.config, max_length=256, chat_template=False)
    mm_batch = lik.collate(mm_records, "pair")
    assert torch.equal(trl_batch["input_ids"], mm_batch.inputs["input_ids"])
    assert torch.equal(trl_batch["attention_mask"], mm_batch.inputs["attention_mask"])
    assert torch.equal(trl_batch["completion_mask"], mm_batch.inputs["loss_mask"])
    with torch.no_grad():
        trl_c, trl_r = trainer.compute_ref_log_probs(trainer.model, trl_batch)
        mm = lik.logps(model, mm_batch).pairs()
    assert_close(trl_c, mm.chosen)
    assert_close(trl_r, mm.rejected)
    assert (trl_c - trl_r).abs().max() > 1e-4  # chosen and rejected differ: not a degenerate comparison


# --------------------------------------------------------------------------- ORPO, CPO (trl.experimental)
# TRL's ORPOTrainer / CPOTrainer put a BOS before the prompt; the records' prompts start with "<bos>" so both
# tokenisations give the same ids (asserted through the per-sequence mean log-probs). ORPO's NLL differs by
# design: TRL averages it over the chosen PROMPT and answer tokens of the batch, mmalign over the answer
# tokens of each example, so the odds-ratio term (loss - nll) is compared. CPO's NLL is over answer tokens
# in both: on the equal-length batch the whole loss agrees.


@pytest.fixture(scope="module")
def experimental(env, tmp_path_factory):
    pytest.importorskip("trl.experimental.orpo")
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    out = SimpleNamespace()
    for name, records in (("mixed", env.mixed.records), ("equal", env.equal.records)):
        records = [dict(r, prompt="<bos> " + r["prompt"]) for r in records]
        data = Dataset.from_list(records)
        common = dict(report_to="none", use_cpu=True, bf16=False, per_device_eval_batch_size=4, beta=BETA)
        orpo = ORPOTrainer(model=env.policy, args=ORPOConfig(str(tmp_path_factory.mktemp("orpo")), **common),
                           processing_class=env.tok, train_dataset=data, eval_dataset=data)
        cpo = CPOTrainer(model=env.policy, args=CPOConfig(str(tmp_path_factory.mktemp("cpo")), **common),
                         processing_class=env.tok, train_dataset=data, eval_dataset=data)
        env.policy.eval()
        batch = orpo._prepare_inputs(next(iter(orpo.get_eval_dataloader())))
        cpo_batch = cpo._prepare_inputs(next(iter(cpo.get_eval_dataloader())))
        with torch.no_grad():
            pol = env.likelihood.logps(env.policy, env.likelihood.collate(records, "pair")).pairs()
        setattr(out, name, SimpleNamespace(orpo=orpo, cpo=cpo, batch=batch, cpo_batch=cpo_batch, pol=pol))
    return out


@pytest.mark.parametrize("which", ["mixed", "equal"])
def test_orpo_odds_ratio_term_matches_trl(experimental, which):
    from mmalign.losses_more import orpo_loss

    e = getattr(experimental, which)
    with torch.no_grad():
        trl_c, trl_r, _, _, trl_nll = e.orpo.concatenated_forward(e.orpo.model, e.batch)
        trl_total = e.orpo.get_batch_loss_metrics(e.orpo.model, e.batch)[0]
    mean = e.pol.mean()
    assert_close(mean.chosen, trl_c)  # same ids, same mean log-probs
    assert_close(mean.rejected, trl_r)
    ours = orpo_loss(e.pol, beta=BETA) - sft_loss(e.pol)
    assert abs(float(ours.mean()) - float(trl_total - trl_nll)) < TOL
    assert float(trl_nll) != pytest.approx(float(sft_loss(e.pol).mean()), abs=1e-3)  # the prompt tokens count there


@pytest.mark.parametrize(("loss_type", "name", "hp"), [
    ("sigmoid", "cpo", {"label_smoothing": 0.0, "cpo_alpha": 1.0}),
    ("sigmoid", "cpo", {"label_smoothing": EPS, "cpo_alpha": 0.5}),
    ("simpo", "cpo_simpo", {"label_smoothing": 0.0, "cpo_alpha": 1.0, "gamma": 0.5}),
    ("simpo", "cpo_simpo", {"label_smoothing": 0.0, "cpo_alpha": 0.0, "gamma": 0.5}),
], ids=["cpo", "cpo-eps", "cpo_simpo", "simpo_only"])
def test_cpo_matches_trl_on_equal_chosen_lengths(experimental, loss_type, name, hp):
    e, trainer = experimental.equal, experimental.equal.cpo
    saved = (trainer.loss_type, trainer.label_smoothing, trainer.cpo_alpha, getattr(trainer, "simpo_gamma", 0.5))
    trainer.loss_type, trainer.label_smoothing, trainer.cpo_alpha = loss_type, hp["label_smoothing"], hp["cpo_alpha"]
    trainer.simpo_gamma = hp.get("gamma", 0.5)
    try:
        with torch.no_grad():
            expected = trainer.get_batch_loss_metrics(trainer.model, e.cpo_batch)[0]
    finally:
        trainer.loss_type, trainer.label_smoothing, trainer.cpo_alpha, trainer.simpo_gamma = saved
    ours = get_loss(name).fn(e.pol, None, beta=BETA, **hp)
    assert abs(float(ours.mean()) - float(expected)) < TOL * max(1.0, abs(float(expected)))


def test_cpo_mixed_lengths_trl_averages_the_nll_over_tokens(experimental):
    """TRL's CPO NLL is sum(-pc) / sum(|c|) over the batch; mmalign's the mean of per-example means."""
    e, trainer = experimental.mixed, experimental.mixed.cpo
    with torch.no_grad():
        expected = trainer.get_batch_loss_metrics(trainer.model, e.cpo_batch)[0]  # sigmoid, cpo_alpha 1
    pair_term = get_loss("cpo").fn(e.pol, None, beta=BETA, label_smoothing=0.0, cpo_alpha=0.0).mean()
    token_nll = -e.pol.chosen.sum() / e.pol.chosen_tokens.sum()
    assert abs(float(pair_term + token_nll) - float(expected)) < TOL * max(1.0, abs(float(expected)))
    ours = get_loss("cpo").fn(e.pol, None, beta=BETA, label_smoothing=0.0, cpo_alpha=1.0).mean()
    assert abs(float(ours) - float(expected)) > 1e-3
