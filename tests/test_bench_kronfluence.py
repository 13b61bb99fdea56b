"""The kronfluence benchmark's pure helpers (benchmarks/kronfluence_bench.py), without kronfluence:
the loss its Task differentiates, the label draws, the damping rule, the data plumbing, and the
agreement and summary of the results."""

import math

import pytest
import torch
from conftest import assert_rel, split_batch, unpad

from benchmarks import kronfluence_bench as kb
from influence.curvature import fit_ekfac
from influence.gradients import collect_grads, grads_from_pairs
from influence.modules import Capture, canonical_weight, find_layers


def per_sample_grads(model, layers, batch, **loss_options):
    """What kronfluence computes per sample: sum_t g_t a_t^T, g the gradient of the Task's loss
    on the whole batch w.r.t. each tracked layer's output."""
    with torch.enable_grad(), Capture(model, layers) as cap:
        cap.backward(kb.causal_lm_loss(model, batch, **loss_options))
    return {name: grads_from_pairs(cap.a[name], cap.g[name]) for name in layers}


def test_task_loss_gives_each_sequence_its_own_gradient(llama, batch):
    # The batch *sum* makes kronfluence's per-sample gradients the per-sequence gradients we use.
    layers = find_layers(llama)
    grads = per_sample_grads(llama, layers, batch)
    for i in range(batch["input_ids"].shape[0]):
        loss = kb.causal_lm_loss(llama, unpad(batch, i))
        for name, m in layers.items():
            params = [m.weight] + ([m.bias] if m.bias is not None else [])
            parts = torch.autograd.grad(loss, params, retain_graph=True)
            expected = torch.cat([parts[0], *(b[:, None] for b in parts[1:])], dim=1)  # [W | b]
            assert expected.shape == canonical_weight(m).shape
            assert_rel(grads[name][i], expected)


def test_sampled_task_labels_are_our_true_fisher_draws(llama, train_batch):
    # Batch i's labels come from the generator our true-Fisher fit seeds for batch i.
    layers = find_layers(llama)
    batches = split_batch(train_batch, 2)
    ours = collect_grads(llama, batches, layers=layers, fisher="true", seed=5, progress=False)
    for i, b in enumerate(batches):
        rows = slice(2 * i, 2 * i + 2)
        same = per_sample_grads(
            llama, layers, b, sample=True, generator=kb.label_generator(seed=5, index=i)
        )
        other = per_sample_grads(
            llama, layers, b, sample=True, generator=kb.label_generator(seed=6, index=i)
        )
        for name in layers:
            assert_rel(same[name], ours[name][rows])
        assert any(not torch.allclose(other[name], ours[name][rows], rtol=1e-3) for name in layers)


def test_sampling_without_a_generator_is_an_error(llama, batch):
    with pytest.raises(ValueError, match="Generator"):
        kb.causal_lm_loss(llama, batch, sample=True)


def test_kronfluence_damping_rule_is_our_relative_damping(llama, train_batch):
    # kronfluence: 0.1 x mean(summed Lambda / examples); ours: 0.1 x mean eigenvalue.
    layers = find_layers(llama)
    ekfac = fit_ekfac(llama, split_batch(train_batch, 3), layers=layers, progress=False)
    examples = train_batch["input_ids"].shape[0]
    for name in layers:
        lambda_sum = ekfac.eigenvalues[name] * examples
        damping = kb.kronfluence_damping(lambda_sum, examples)
        assert damping > 0
        assert math.isclose(damping, ekfac.damping_of(name), rel_tol=1e-12)


def test_bench_model_and_data_follow_the_setting():
    setting = kb.Setting()
    model = kb.build_model(setting)
    layers = find_layers(model)
    assert len(layers) == 28
    assert 550_000 <= sum(p.numel() for p in model.parameters()) <= 650_000
    train = kb.make_sequences(setting, setting.n_train, offset=0)
    queries = kb.make_sequences(setting, setting.n_query, offset=1)
    assert train["input_ids"].shape == (setting.n_train, setting.seq_len)
    assert not torch.equal(train["input_ids"][: setting.n_query], queries["input_ids"])
    assert torch.equal(kb.make_sequences(setting, 4, offset=0)["input_ids"], train["input_ids"][:4])


def test_kronfluence_batches_map_to_our_batch_indices():
    # kronfluence's sequential loader collates Sequences rows into the batches ``split`` makes.
    setting = kb.Setting(n_train=12, batch_size=4)
    train = kb.make_sequences(setting, setting.n_train, offset=0)
    ours = kb.split(train, setting.batch_size)
    index = {kb.batch_key(b): i for i, b in enumerate(ours)}
    rows = kb.Sequences(train)
    assert len(rows) == 12
    for i in range(3):
        collated = torch.utils.data.default_collate([rows[j] for j in range(4 * i, 4 * i + 4)])
        assert index[kb.batch_key(collated)] == i
    shuffled = torch.utils.data.default_collate([rows[j] for j in (1, 0, 2, 3)])
    assert kb.batch_key(shuffled) not in index


def test_agreement_is_scale_free_and_sees_a_reversed_query():
    gen = torch.Generator().manual_seed(0)
    ours = torch.randn(4, 50, dtype=torch.float64, generator=gen)
    agree = kb.agreement(ours, ours / 2.5)
    assert agree["spearman_min"] == pytest.approx(1.0)
    assert agree["ratio_median"] == pytest.approx(2.5)
    assert agree["max_relative_difference"] == pytest.approx(1.5)
    theirs = ours.clone()
    theirs[2] = -theirs[2]
    flipped = kb.agreement(ours, theirs)
    assert flipped["spearman_min"] == pytest.approx(-1.0)
    assert flipped["spearman_mean"] == pytest.approx(0.5)
    assert flipped["ratio_min"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shape"):
        kb.agreement(ours, ours[:, :10])


def record(method, seconds, peak, **extra):
    times = {f"{stage}_{kind}": seconds[stage] for stage in kb.TIMES for kind in ("s", "cpu_s")}
    return {"method": method, **times, "peak_rss_mb": peak, "extra_peak_mb": peak - 400, **extra}


def test_summary_takes_medians_ratios_and_verdicts():
    ours_only = {
        f"{stage}_{kind}": seconds
        for stage, seconds in {"pairwise": 2.0, "bare_grads": 1.0, "capture_pass": 0.5}.items()
        for kind in ("s", "cpu_s")
    }
    runs = [
        record("ours", {"fit": 3.0, "score": 1.0, "total": 4.0}, 500, **ours_only),
        record("kronfluence", {"fit": 8.0, "score": 2.0, "total": 10.0}, 600),
        record("ours", {"fit": 9.0, "score": 9.0, "total": 18.0}, 700, **ours_only),  # an outlier
        record("kronfluence", {"fit": 8.0, "score": 2.0, "total": 10.0}, 600),
        record("ours", {"fit": 3.0, "score": 1.0, "total": 4.0}, 500, **ours_only),
        record("kronfluence", {"fit": 8.0, "score": 2.0, "total": 10.0}, 600),
    ]
    assert "f32_total_ratio" not in kb.summarise(runs)["ratios"]  # ours_f32 is optional
    runs.append(record("ours_f32", {"fit": 2.0, "score": 1.0, "total": 3.0}, 450, **ours_only))
    result = kb.summarise(runs)
    assert result["ratios"]["f32_total_ratio"] == pytest.approx(0.3)
    assert result["ratios"]["f32_peak_rss_ratio"] == pytest.approx(450 / 600)
    assert result["medians"]["ours"]["total_s"] == 4.0
    assert result["ratios"]["total_ratio"] == pytest.approx(0.4)
    assert result["ratios"]["total_cpu_ratio"] == pytest.approx(0.4)
    assert result["ratios"]["peak_rss_ratio"] == pytest.approx(500 / 600)
    assert result["ratios"]["pairwise_over_bare"] == pytest.approx(2.0)
    assert result["ratios"]["pass_floor_ratio"] == pytest.approx(3 * 0.5 / 10)
    verdicts = {name: t["met"] for name, t in result["targets"].items()}
    assert verdicts == {"total_ratio": True, "peak_rss_ratio": True, "pairwise_over_bare": False}
    result["agreement"] = kb.agreement(torch.eye(3), torch.eye(3))
    table = kb.markdown_table(result)
    assert result["targets"]["total_ratio"]["met_cpu"]
    assert "met_cpu" not in result["targets"]["peak_rss_ratio"]
    row = "| fit + scores | 4.00 (4.00) | 10.00 (10.00) | 0.40 (0.40) | <= 0.5: met (met in CPU time) |"
    assert row in table
    assert "<= 1.5: missed (missed in CPU time)" in table
    f32_row = "| ours with float32 products: fit / fit + scores | 2.00 (2.00) / 3.00 (3.00) |"
    assert f32_row in table
    with pytest.raises(ValueError, match="kronfluence"):
        kb.summarise([r for r in runs if r["method"] == "ours"])


def test_machine_description_names_cpu_and_versions():
    info = kb.machine()
    assert info["nproc"] >= 1
    assert info["torch"] == torch.__version__.split("+")[0] or info["torch"] == torch.__version__
    assert {"cpu", "python", "transformers", "kronfluence"} <= set(info)
