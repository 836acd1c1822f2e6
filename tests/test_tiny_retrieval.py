"""Retrieval supervision for training the tiny models (longctx/tiny/retrieval.py)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longctx import tiny
from longctx.hub import load_tiny
from longctx.tiny.retrieval import KeyProbe, answer_targets, capturing, contrast_loss, retrieval_loss


def test_answer_targets_point_at_the_token_to_copy_and_the_keys():
    _, tok = load_tiny("tiny")
    stream = tiny.SampleStream(tok, 3, tiny.load_essay_words(), tiny.RETRIEVAL_MIX)
    stream.want_spans = True
    copies = gathers = 0
    for _ in range(12):
        ids, labels = stream.sample(400, extra_questions=2)
        targets = stream.last_spans[-1]
        for t, s0, s1 in targets.get("match", []) + targets.get("copy", []):
            assert s0 == s1 < t and labels[t + 1] == ids[t + 1] == ids[s0] != -100  # the token to copy
            line = tok.decode(ids[max(0, s0 - 120):s0 + 1]).rsplit("special magic", 1)
            assert len(line) == 2 and " is: " in line[1]  # ... inside a needle
            copies += 1
        for t, s0, s1 in targets.get("gather", []):
            assert s0 <= s1 < t
            key = tok.decode(ids[s0:s1 + 1]).strip()
            before = tok.decode(ids[s0 - 2:s0]) + " " + tok.decode(ids[s1 + 1:s1 + 3])
            assert key and ("for" in before or "," in before or "and" in before), (key, before)
            gathers += 1
    assert copies >= 50 and gathers >= 2 * 12


def test_answer_targets_skip_missing_values():
    prompt = "xx One of the special magic numbers for a-b is: 123."
    text = prompt + " 123. 456."
    offsets = [(i, i + 1) for i in range(len(text))]
    n = len(prompt)
    got = answer_targets(text, offsets, n, ["123", "456"], ["a-b", "c-d"])
    assert got["match"] == [(n, n - 4, n - 4)]
    assert got["copy"] == [(n + 1, n - 3, n - 3), (n + 2, n - 2, n - 2)]
    assert got["needles"] == [n - 4] and got["contrast"] == [(n, 0)]
    key = (prompt.index("a-b"), prompt.index("a-b") + 2)
    assert got["gather"] == [(n - 4 + j, *key) for j in range(3)]  # the question never names the key


def test_retrieval_loss_matches_eager_attention():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 40))
    spans = [[(30, 5, 9), (39, 12, 20), (20, 20, 20)], [(25, 0, 3)]]
    with torch.no_grad(), capturing(model) as store:
        logits = model(ids).logits
        got = retrieval_loss(store, spans, 2, 3)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    assert torch.allclose(out.logits, logits, atol=1e-5)  # the capture leaves the forward unchanged
    expected = [-torch.log(out.attentions[2][b, 3, t, s0:s1 + 1].sum()) for b, row in enumerate(spans)
                for t, s0, s1 in row]
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-5)
    assert model.config._attn_implementation == "eager"


def test_spread_loss_is_zero_only_for_even_attention_on_the_targets():
    # one query at t=9 over 10 keys, D=1: the score of key j is c * k_j; targets are keys 2..5
    torch.manual_seed(1)
    noise = 0.1 * torch.randn(10)

    def losses(on_targets):
        k = (-1.0 + noise).clone()
        k[on_targets] = 1.0
        q = torch.full((1, 1, 10, 1), 40.0)
        store = {0: (q, k.view(1, 1, 10, 1), 1.0)}
        return (retrieval_loss(store, [[(9, 2, 5)]], 0, 0).item(),
                retrieval_loss(store, [[(9, 2, 5)]], 0, 0, spread=True).item())

    even_mass, even_spread = losses([2, 3, 4, 5])
    one_mass, one_spread = losses([3])
    assert even_mass < 1e-6 and one_mass < 1e-6  # the mass loss cannot tell them apart
    assert abs(even_spread) < 1e-5  # KL(uniform || attention) is 0 for even attention on the targets
    assert one_spread > 10.0  # and large when one target takes all the attention


def test_gather_spread_reaches_the_stages_and_the_loss():
    stages = tiny.configure_stages(tiny.RETRIEVAL, gather_spread=True)
    assert all(s.gather_spread for s in stages) and not any(s.gather_spread for s in tiny.RETRIEVAL)
    assert not any(s.gather_spread for s in tiny.configure_stages(tiny.RETRIEVAL))
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked attention (a random model's is nearly even, where both losses agree)
        model.model.layers[tiny.supervised_heads(cfg)["gather"][0]].self_attn.q_proj.weight.mul_(30.0)
    ids = torch.randint(3, 64, (1, 40))
    spans = [{"gather": [(30, 5, 12)], "copy": [(31, 20, 20)]}]
    args = (model, ids, ids.clone(), torch.arange(40)[None], False, None, 0, None, spans, None, "basic")
    with torch.no_grad():
        plain = tiny._loss(*args)[2]
        spread = tiny._loss(*args, gather_spread=True)[2]
        with capturing(model) as store:
            model(ids)
            gather = retrieval_loss(store, [spans[0]["gather"]], *tiny.supervised_heads(cfg)["gather"], spread=True)
            copy = retrieval_loss(store, [spans[0]["copy"]], *tiny.supervised_heads(cfg, "basic")["copy"])
    assert torch.allclose(spread, gather + copy, atol=1e-5) and not torch.allclose(plain, spread)


def test_retrieval_weight_trains_the_attention():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (1, 32))
    labels = ids.clone()
    pos = torch.arange(32)[None]
    spans = [{"copy": [(31, 10, 12)], "gather": [(30, 3, 5)]}]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        _, _, ret, _ = tiny._loss(model, ids, labels, pos, False, spans=spans)
        first = ret.item() if first is None else first
        opt.zero_grad()
        ret.backward()
        opt.step()
    assert ret.item() < 0.5 * first


def test_train_with_retrieval_weight_logs_and_lowers_the_retrieval_loss():
    essay = tiny.load_essay_words()[:5000]
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=essay)
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    model = tiny.build_model(cfg, tok, seed=0)
    stages = [tiny.Stage(steps=40, min_len=96, max_len=160, batch_size=4, retrieval_weight=1.0)]
    hist = tiny.train({"m": model}, tok, stages, seed=0, lr=3e-3, warmup=5, log_every=10, autocast=False,
                      mix=[("niah_multikey_2", 1.0)], essay_words=essay)
    ret = [h["retrieval_m"] for h in hist]
    assert len(ret) == 4 and ret[-1] < 0.8 * ret[0], ret
    assert model.config._attn_implementation == "sdpa"  # the capture is gone after training


def test_contrast_loss_prefers_the_right_needle():
    torch.manual_seed(0)
    out = torch.randn(1, 30, 2, 8)  # [B, S, H, D]
    out[0, 25, 1] = out[0, 10, 1] * 3  # position 25 points the same way as needle 10 (head 1)
    spans = [{"contrast": [(25, 1)], "needles": [4, 10, 17]}]
    right = contrast_loss({("out", 0): out}, spans, 0, 1)
    wrong = contrast_loss({("out", 0): out}, [{"contrast": [(25, 0)], "needles": [4, 10, 17]}], 0, 1)
    assert right < 0.1 < 1.0 < wrong
    assert contrast_loss({("out", 0): out}, [{"contrast": [], "needles": [4]}], 0, 1) == 0


def test_key_probe_reads_the_key_tokens():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = LlamaForCausalLM(cfg)
    probe = KeyProbe(32)
    ids = torch.randint(0, 64, (2, 20))
    hidden = torch.randn(2, 20, 32, requires_grad=True)
    spans = [[(15, 3, 5)], [(19, 0, 0), (10, 2, 4)]]
    loss = probe.loss(model, hidden, ids, spans)
    emb = model.get_input_embeddings().weight
    logp = lambda b, t: torch.log_softmax(model.model.norm(probe.proj(hidden[b, t])) @ emb.T, -1)  # noqa: E731
    want = torch.stack([-logp(0, 15)[ids[0, 3:6]].mean(), -logp(1, 19)[ids[1, :1]].mean(),
                        -logp(1, 10)[ids[1, 2:5]].mean()]).mean()
    assert torch.allclose(loss, want, atol=1e-5)
    loss.backward()
    assert hidden.grad[0, 15].abs().sum() > 0 and hidden.grad[0, 14].abs().sum() == 0


def test_configure_stages_applies_the_cli_settings():
    main = tiny.configure_stages(tiny.CURRICULUM, 2.0, 1.0, "basic")
    assert [s.steps for s in main] == [2 * s.steps for s in tiny.CURRICULUM]
    assert main[0].copy_only and main[0].retrieval_weight == 0  # the copy warm-up stays unsupervised
    assert all(s.retrieval_weight == 1.0 and s.retrieval_roles == "basic" for s in main[1:])
    follow = tiny.configure_stages(tiny.RETRIEVAL, 1.0, 0.0, "full", first_weight=1.0)
    assert [s.first_weight for s in follow] == [1.0, 1.0] and [s.first_weight for s in tiny.RETRIEVAL] == [5.0, 5.0]
    assert all(s.retrieval_weight == 1.0 for s in follow)  # the curriculum's own weight is kept
    with pytest.raises(ValueError, match="retrieval_roles"):
        tiny.Stage(steps=1, min_len=8, max_len=8, batch_size=1, retrieval_roles="some")
    counted = tiny.configure_stages(tiny.RETRIEVAL, 3.0, stage_steps=[7, 11])
    assert [s.steps for s in counted] == [7, 11]  # replaces the scale
    with pytest.raises(ValueError, match="stage_steps requires 2"):
        tiny.configure_stages(tiny.RETRIEVAL, stage_steps=[7])
    with pytest.raises(ValueError, match="stage_steps requires 2"):
        tiny.configure_stages(tiny.RETRIEVAL, stage_steps=[7, 11, 3, 2])
    longer = tiny.configure_stages(tiny.RETRIEVAL, stage_steps=[7, 11, 3])  # appends the long stage
    assert [s.steps for s in longer] == [7, 11, 3] and len(tiny.RETRIEVAL) == 2
    last = tiny.RETRIEVAL[-1]
    assert (longer[2].min_len, longer[2].max_len) == (last.max_len, last.max_len * tiny.LONG_STAGE_FACTOR)
    assert longer[2].mix == last.mix and longer[2].retrieval_weight == last.retrieval_weight
    with pytest.raises(ValueError, match="--stage-steps requires exactly one"):
        tiny.train_tiny_main(["--stage-steps", "5,5", "--out-dir", "/nonexistent"])


def test_mix_replaces_every_mixture_but_the_copy_warm_up():
    mix = tiny.parse_mix("niah_multikey_2:3, niah_multivalue:0.5")
    assert mix == (("niah_multikey_2", 3.0), ("niah_multivalue", 0.5))
    main = tiny.configure_stages(tiny.CURRICULUM, mix=mix)
    assert main[0].copy_only and main[0].mix == tiny.CURRICULUM[0].mix
    assert all(s.mix == mix for s in main[1:])
    longer = tiny.configure_stages(tiny.RETRIEVAL, stage_steps=[2, 3, 4], mix=mix)
    assert [s.mix for s in longer] == [mix] * 3
    for bad, what in [("niah_nothing:1", "task from"), ("niah_multikey_2", "task:weight"),
                      ("niah_multikey_2:-1", "weight > 0"), ("copy:x", "weight > 0"),
                      ("copy:1,copy:2", "each task once")]:
        with pytest.raises(ValueError, match=what):
            tiny.parse_mix(bad)
    with pytest.raises(ValueError, match="--mix requires one of"):
        tiny.train_tiny_main(["--mix", "copy:1", "--out-dir", "/nonexistent"])


def test_basic_roles_fold_match_into_copy_and_skip_the_probe():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg)
    assert tiny.supervised_heads(cfg) == {"gather": (1, 2), "match": (2, 2), "copy": (2, 0)}
    assert tiny.supervised_heads(cfg, "basic") == {"gather": (1, 2), "copy": (2, 0)}
    ids = torch.randint(0, 64, (1, 32))
    spans = [{"match": [(20, 5, 5)], "copy": [(21, 6, 6)], "gather": [(20, 1, 3)], "needles": [5, 12],
              "contrast": [(20, 0)]}]
    probe = KeyProbe(32)
    args = (model, ids, ids, torch.arange(32)[None], False)
    _, _, basic, _ = tiny._loss(*args, spans=spans, key_probe=probe, roles="basic")
    with torch.no_grad(), capturing(model) as store:
        model(ids)
        want = retrieval_loss(store, [[(20, 5, 5), (21, 6, 6)]], 2, 0) + retrieval_loss(store, [[(20, 1, 3)]], 1, 2)
    assert torch.allclose(basic, want, atol=1e-5)
    _, _, full, _ = tiny._loss(*args, spans=spans, key_probe=probe, roles="full")
    assert not torch.allclose(full, basic)


def test_gather_tail_targets_the_second_token_after_the_first_dash():
    prompt = "xx One of the special magic numbers for ab-cd is: 123. Numbers for ab-cd:"
    text = prompt + " 123."
    offsets = [(i, i + 1) for i in range(len(text))]  # one character per token
    got = answer_targets(text, offsets, len(prompt), ["123"], ["ab-cd"])
    key_in_needle, key_asked = prompt.index("ab-cd"), prompt.rindex("ab-cd")
    # 'd' of 'cd': the dash is the key's third character, the tail target two tokens after it
    want = {key_in_needle + 4, key_asked + 4}
    assert {j for _, j, j2 in got["gather_tail"] if j == j2} == want
    assert [t for t, _, _ in got["gather_tail"]] == [t for t, _, _ in got["gather"]]
    # a key without a dash, or one whose part after the dash is one token: its last token
    short = answer_targets(text.replace("ab-cd", "abcde"), offsets, len(prompt), ["123"], ["abcde"])
    assert {j for _, j, _ in short["gather_tail"]} == {key_in_needle + 4, key_asked + 4}
    one = "xx One of the special magic numbers for abc-d is: 123. Numbers for abc-d:"
    got = answer_targets(one + " 123.", offsets, len(one), ["123"], ["abc-d"])
    assert {j for _, j, _ in got["gather_tail"]} == {one.index("abc-d") + 4, one.rindex("abc-d") + 4}


def test_two_gather_roles_train_a_second_gathering_head():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg)
    assert tiny.supervised_heads(cfg, "two_gather") == {"gather": (1, 2), "gather_tail": (1, 3), "match": (2, 2),
                                                         "copy": (2, 0)}
    ids = torch.randint(0, 64, (1, 32))
    spans = [{"match": [(20, 5, 5)], "copy": [(21, 6, 6)], "gather": [(20, 1, 3)], "gather_tail": [(20, 3, 3)],
              "needles": [5, 12], "contrast": [(20, 0)]}]
    args = (model, ids, ids, torch.arange(32)[None], False)
    _, _, full, _ = tiny._loss(*args, spans=spans, key_probe=KeyProbe(32), roles="full")
    _, _, two, _ = tiny._loss(*args, spans=spans, key_probe=KeyProbe(32), roles="two_gather")
    with torch.no_grad(), capturing(model) as store:
        model(ids)
        tail = retrieval_loss(store, [[(20, 3, 3)]], 1, 3)
        one, both = contrast_loss(store, spans, 1, 2), contrast_loss(store, spans, 1, [2, 3])
        assert torch.allclose(contrast_loss(store, spans, 1, [2]), one)
    # the same losses but for the tail head's attention term and the contrast over both heads
    # (the key probes are fresh random maps: compare without them)
    _, _, full_np, _ = tiny._loss(*args, spans=spans, roles="full")
    _, _, two_np, _ = tiny._loss(*args, spans=spans, roles="two_gather")
    assert torch.allclose(two_np, full_np - one + both + tail, atol=1e-5)
    assert torch.isfinite(full) and torch.isfinite(two)
    with pytest.raises(ValueError, match="retrieval_roles in"):
        tiny.Stage(steps=1, min_len=8, max_len=8, batch_size=1, retrieval_roles="three_gather")


def test_circuit_report_reads_the_supervised_heads(tmp_path, capsys):
    from longctx.tiny.retrieval import circuit_report

    model, tok = load_tiny("tiny")
    torch.manual_seed(0)
    rep = circuit_report(model, tok, "niah_multikey_2", 1024, n=2, seed=5)
    assert rep["answers"] >= 2 and rep["key_tokens"] > 3
    assert 0.0 <= rep["gather_key_share"] <= 1.0 and 1.0 <= rep["gather_key_tokens"] <= rep["key_tokens"]
    assert rep["first_token_right"] == 1.0  # the bundled target retrieves at 1K
    # the gathered key is closest to the right needle's: above every other needle's cosine
    assert rep["gather_top1"] == 1.0 and rep["gather_right_cos"] > rep["gather_best_other_cos"]
    assert -1.0 <= rep["gather_best_other_cos"] <= 1.0 and rep["needles"] > 1
    # a random model of the same shape neither gathers the key nor predicts the value
    rand = LlamaForCausalLM(model.config).eval()
    bad = circuit_report(rand, tok, "niah_multikey_2", 1024, n=2, seed=5)
    assert bad["gather_key_share"] < 0.5 and bad["first_token_right"] < 1.0
    with pytest.raises(ValueError, match="circuit_report requires task"):
        circuit_report(model, tok, "niah_nothing", 1024)
    with pytest.raises(ValueError, match="TASK:LENGTH:N"):
        tiny.train_tiny_main(["--eval-only", "--out-dir", str(tiny.MODELS_DIR), "--circuit-report", "niah_multikey_2"])
    assert tiny.train_tiny_main(["--eval-only", "--out-dir", str(tiny.MODELS_DIR),
                                 "--circuit-report", "niah_multikey_2:512:1"]) == 0
    assert '"gather_key_tokens"' in capsys.readouterr().out
    # a second gathering head (here an untrained one: any head reads as one) is reported on request
    two = circuit_report(model, tok, "niah_multikey_2", 1024, n=2, seed=5, roles="two_gather")
    assert 0.0 <= two["tail_share"] <= 1.0 and 0.0 <= two["pair_top1"] <= 1.0
    assert {k: v for k, v in two.items() if k not in ("tail_share", "pair_top1")} == rep


def test_resolve_device_names_what_it_accepts():
    assert tiny.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device requires a torch device"):
        tiny.resolve_device("gpu0")
    with pytest.raises(ValueError, match="--device requires 'cpu' or a CUDA device"):
        tiny.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="requires a CUDA GPU"):
            tiny.resolve_device("cuda")
    with pytest.raises(ValueError, match="--device requires"):
        tiny.train_tiny_main(["--device", "gpu0", "--out-dir", "/nonexistent"])


def _small_retrieval_run(device: torch.device, steps: int = 3):
    essay = tiny.load_essay_words()[:3000]
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=essay)
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    model = tiny.build_model(cfg, tok, seed=0).to(device)
    stages = [tiny.Stage(steps=steps, min_len=128, max_len=192, batch_size=2, retrieval_weight=1.0,
                         gather_spread=True, final_weight=5.0)]
    probes = {"m": tiny.PrevTokenProbes(cfg.hidden_size)}
    return tiny.train({"m": model}, tok, stages, seed=0, lr=1e-3, warmup=1, log_every=1, autocast=False,
                      mix=[("niah_multikey_2", 1.0)], essay_words=essay, probes=probes), model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="requires a CUDA GPU")
def test_train_runs_on_the_gpu_as_on_the_cpu():
    cpu_hist, _ = _small_retrieval_run(torch.device("cpu"))
    gpu_hist, model = _small_retrieval_run(torch.device("cuda"))
    assert next(model.parameters()).device.type == "cuda"
    # same seeded batches and initial weights: the first step's losses agree up to kernel differences
    assert abs(cpu_hist[0]["loss_m"] - gpu_hist[0]["loss_m"]) < 1e-2 * max(1.0, cpu_hist[0]["loss_m"])
    assert abs(cpu_hist[0]["retrieval_m"] - gpu_hist[0]["retrieval_m"]) < 1e-2 * max(1.0, cpu_hist[0]["retrieval_m"])
