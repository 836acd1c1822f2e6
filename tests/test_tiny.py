"""The bundled tiny models (longctx/models_data) and the script that trains them (longctx/tiny/)."""
import dataclasses
import random
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longctx import tiny
from longctx.hub import MODELS_DATA, load_tiny, resolve_model_path

TARGET = MODELS_DATA / "tiny-target"
DRAFT = MODELS_DATA / "tiny-draft"


@pytest.fixture(scope="module")
def target():
    return load_tiny("tiny")


def test_resolve_model_path():
    assert resolve_model_path("tiny") == str(TARGET)
    assert resolve_model_path("tiny-target") == str(TARGET)
    assert resolve_model_path("tiny-draft") == str(DRAFT)
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    assert resolve_model_path("/a/path") == "/a/path"


def test_bundled_models_load_by_path_and_size():
    total = 0
    for path in (TARGET, DRAFT):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        cfg = model.config
        assert cfg.model_type == "llama"
        assert cfg.head_dim >= 32 and cfg.num_attention_heads % cfg.num_key_value_heads == 0
        assert len(tok) == cfg.vocab_size
        total += sum(f.stat().st_size for f in Path(path).iterdir())
    assert total <= 25 * 2**20
    t, d = (AutoModelForCausalLM.from_pretrained(p).config for p in (TARGET, DRAFT))
    assert t.num_key_value_heads < t.num_attention_heads  # GQA
    # draft is several times cheaper per token (non-embedding parameters)
    per_layer = lambda c: c.num_hidden_layers * (c.hidden_size * c.head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2) + 3 * c.hidden_size * c.intermediate_size)  # noqa: E731
    assert per_layer(t) >= 3 * per_layer(d)


def test_tokenizer_round_trips_numbers_uuids_words(target):
    _, tok = target
    rng = random.Random(0)
    words = tiny._KEY_ADJ[:50] + tiny._KEY_NOUN[:50]
    texts = [str(rng.randint(10**6, 10**7 - 1)) for _ in range(20)]
    texts += [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(20)]
    texts += [f"{rng.choice(words)}-{rng.choice(words)}" for _ in range(20)] + ["Zyzzyva, qwerty! 42"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # digit-level numbers: a 7-digit number is 7 tokens
    assert len(tok(" 1234567", add_special_tokens=False)["input_ids"]) == 8  # space + 7 digits


def test_split_uuid_hex_spells_uuids_one_character_per_token(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    assert tiny.splits_uuid_hex(AutoTokenizer.from_pretrained(TARGET))  # the shipped tokenizer splits
    before = AutoTokenizer.from_pretrained(TARGET)
    before.backend_tokenizer.pre_tokenizer = tiny._pre_tokenizer(split_uuid_hex=False)  # as first trained
    after = tiny.split_uuid_hex(AutoTokenizer.from_pretrained(TARGET))
    after.backend_tokenizer.pre_tokenizer = tiny._pre_tokenizer(split_uuid_hex=False)
    after = tiny.split_uuid_hex(after)
    rng = random.Random(3)
    uuids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(200)]
    uuids += ["d2c7bffb-6118-433b-882c-cd1e6c93a791", "0a1b2c3d-abcd-4eef-8fed-cafe00beef12"]  # letter pairs
    merged = 0
    for u in uuids:
        pieces = after.tokenize(" " + u)
        assert pieces[0] == "Ġ" and all(len(p) == 1 for p in pieces[1:]), (u, pieces)
        assert after.decode(after(" " + u)["input_ids"], skip_special_tokens=True) == " " + u
        merged += any(len(p.lstrip("Ġ")) > 1 for p in before.tokenize(" " + u))
    assert merged > 50  # the old spelling used two-letter tokens in most uuids
    # everything else is spelt as before: essay text, keys, numbers, the templates
    words = tiny.load_essay_words()[:3000]
    text = " ".join(words) + " " + " ".join(tiny.random_key(rng) for _ in range(300)) + " is: 4296204."
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert tiny.splits_uuid_hex(after) and not tiny.splits_uuid_hex(before)
    assert tiny.split_uuid_hex(after) is after  # idempotent
    after.save_pretrained(tmp_path)
    assert tiny.splits_uuid_hex(AutoTokenizer.from_pretrained(tmp_path))
    built = tiny.build_tokenizer(vocab_size=400, essay_words=words, split_uuid_hex=True)
    assert tiny.splits_uuid_hex(built) and all(len(p) == 1 for p in built.tokenize(uuids[-1]))
    with pytest.raises(ValueError, match="split_uuid_hex requires a tokenizer from longctx.tiny.build_tokenizer"):
        tiny.split_uuid_hex(PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())))


def test_chat_template_applies(target):
    _, tok = target
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nhello</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id


def test_target_retrieves_needle_at_1k(target):
    model, tok = target
    samples = tiny.sized_niah_samples(tok, "niah_single_1", 1024, 3, seed=7)
    for s in samples:
        assert 700 < len(tok.tokenize(s.prompt)) <= 1024 - 128
        text, _ = tiny.greedy_answer(model, tok, s.prompt, 10)
        assert s.outputs[0] in text, (s.outputs, text)


def test_ruler_prompt_format():
    s = tiny.niah_sample(random.Random(0), "niah_single_1", 3, tiny.load_essay_words())
    assert s.prompt.startswith("A special magic number is hidden within the following text. Make sure to memorize it.")
    assert tiny.NOISE_LINE in s.prompt and "One of the special magic numbers for " in s.prompt
    assert s.prompt.endswith(" mentioned in the provided text is")
    m = tiny.niah_sample(random.Random(0), "niah_multiquery", 50, tiny.load_essay_words())
    assert m.prompt.startswith("Some special magic numbers are hidden") and m.prompt.endswith("text are")
    assert ", and " in m.prompt.split("\n")[-1] and len(m.outputs) == 4
    assert tiny.string_match_all([" 1, 2"], [["1", "3"]]) == 50.0


def test_training_reduces_loss():
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    model = tiny.build_model(cfg, tok, seed=0)
    stages = [tiny.Stage(steps=30, min_len=48, max_len=96, batch_size=4)]
    hist = tiny.train({"m": model}, tok, stages, seed=0, lr=3e-3, warmup=5, log_every=5,
                      mix=[("niah_single_1", 1.0)], essay_words=tiny.load_essay_words()[:5000])
    losses = [h["loss_m"] for h in hist]
    assert len(losses) == 6
    assert losses[-1] < 0.6 * losses[0], losses


def test_prev_token_probes_train_and_stay_out_of_the_model(tmp_path):
    """The probes' loss falls on copy text (the first layer learns previous-token heads) and the
    saved model is a plain Llama checkpoint without them."""
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    model = tiny.build_model(cfg, tok, seed=0)
    probes = tiny.PrevTokenProbes(cfg.hidden_size)
    stages = [tiny.Stage(steps=200, min_len=64, max_len=64, batch_size=16, copy_only=True, aux_weight=1.0)]
    hist = tiny.train({"m": model}, tok, stages, seed=0, lr=3e-3, warmup=10, log_every=25,
                      essay_words=tiny.load_essay_words()[:5000], probes={"m": probes}, autocast=False)
    probe = [h["probe_m"] for h in hist]
    assert probe[-1] < 0.8 * probe[0], probe  # ~5.6 -> ~3.9 nats (uniform over 400 tokens: 6.0)
    tiny.save_model(model, tok, tmp_path)
    from safetensors.torch import load_file

    names = load_file(tmp_path / "model.safetensors").keys()
    assert not any("head" in n and "lm_head" not in n for n in names)
    assert set(names) == set(model.state_dict().keys()) - {"lm_head.weight"} or set(names) == set(model.state_dict())


def test_final_token_weights_mark_span_ends():
    """The last token of a copied span (next label ignored) and the last digit of a value (next label
    not a digit) get the weight; everything else 1; ignored labels keep their weight but carry no loss."""
    digits = torch.tensor([10, 11, 12])
    target = torch.tensor([[-100, 5, 6, 7, -100, 10, 11, 12, 3, 2, -100],
                           [-100, -100, 10, 10, 4, -100, -100, 8, 9, 1, 1]])
    w = tiny.final_token_weights(target, digits, 5.0)
    want = torch.ones_like(w)
    want[0, 3] = want[0, 7] = want[0, 9] = 5.0  # span end, last digit, end before -100
    want[1, 3] = want[1, 4] = want[1, 10] = 5.0  # last digit, span end, last token of the row
    assert torch.equal(w, want)
    assert torch.equal(tiny.final_token_weights(target, digits, 1.0), torch.ones_like(w))
    # first digits of values (a digit whose previous label is not one): [0, 5] and [1, 2]
    w = tiny.final_token_weights(target, digits, 5.0, first_weight=3.0)
    want[0, 5] = want[1, 2] = 3.0
    assert torch.equal(w, want)


def test_extra_questions_ask_other_needles():
    rng = random.Random(3)
    s = tiny.niah_sample(rng, "niah_single_1", 5, tiny.load_essay_words(), extra_questions=3)
    assert "\nWhat is the special magic" not in s.answer  # one needle: nothing else to ask
    m = tiny.niah_sample(rng, "niah_multikey_2", 8, tiny.load_essay_words(), extra_questions=3)
    asked = [line.split(" for ")[1].split(" mentioned")[0] for line in m.answer.split("\n")[1:]]
    query = m.prompt.split("What is the special magic number for ")[1].split(" mentioned")[0]
    assert len(asked) == 3 and len(set(asked)) == 3 and query not in asked


def test_average_checkpoints_is_the_mean_and_checks_its_sources(tmp_path):
    """``train-tiny --average``: the uniform mean of the sources' weights; different shapes refuse."""
    from transformers import AutoModelForCausalLM

    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    for i in range(3):
        tiny.save_model(tiny.build_model(cfg, tok, seed=i), tok, tmp_path / f"run{i}" / "tiny-target")
    rc = tiny.train_tiny_main(["--models", "target", "--average", ",".join(str(tmp_path / f"run{i}") for i in range(3)),
                               "--out-dir", str(tmp_path / "soup"), "--eval-lengths", ""])
    assert rc == 0
    runs = [AutoModelForCausalLM.from_pretrained(tmp_path / f"run{i}" / "tiny-target").state_dict() for i in range(3)]
    soup = AutoModelForCausalLM.from_pretrained(tmp_path / "soup" / "tiny-target").state_dict()
    for k, v in soup.items():
        torch.testing.assert_close(v, (runs[0][k] + runs[1][k] + runs[2][k]) / 3)
    assert not torch.equal(runs[0]["model.layers.0.mlp.up_proj.weight"], runs[1]["model.layers.0.mlp.up_proj.weight"])
    wide = dataclasses.replace(cfg, intermediate_size=192)
    tiny.save_model(tiny.build_model(wide, tok, seed=0), tok, tmp_path / "wide" / "tiny-target")
    with pytest.raises(ValueError, match="one config and tokenizer"):
        tiny.average_checkpoints([tmp_path / "run0", tmp_path / "wide"], tmp_path / "bad")
    # same vocabulary, uuid letters split in one only: a different tokenizer
    tiny.save_model(tiny.build_model(cfg, tok, seed=5), tiny.split_uuid_hex(tok), tmp_path / "split" / "tiny-target")
    with pytest.raises(ValueError, match="one config and tokenizer"):
        tiny.average_checkpoints([tmp_path / "run0", tmp_path / "split"], tmp_path / "bad")
    with pytest.raises(ValueError, match="at least two sources"):
        tiny.average_checkpoints([tmp_path / "run0"], tmp_path / "bad")
    with pytest.raises(ValueError, match="missing"):
        tiny.average_checkpoints([tmp_path / "run0", tmp_path / "nowhere"], tmp_path / "bad")


def test_hard_keys_make_near_miss_distractors_and_default_to_the_old_stream():
    rng = random.Random(3)
    for _ in range(200):
        key = tiny.random_key(rng)
        near = tiny.near_key(rng, key)
        assert near != key and near.count("-") >= 1
        assert near.split("-")[0] == key.split("-")[0] or near[0] == key[0]
    s = tiny.niah_sample(random.Random(5), "niah_multikey_2", 40, [], hard_keys=1.0)
    lines = [ln for ln in s.prompt.splitlines() if ln.startswith("One of the special magic numbers for ")]
    keys = [ln.split(" for ")[1].split(" is:")[0] for ln in lines]
    asked = s.prompt.split("What is the special magic number for ")[1].split(" mentioned")[0]
    assert len(keys) == 41 and keys.count(asked) == 1 and len(set(keys)) == 41  # no key twice
    assert all(k[0] == asked[0] for k in keys)  # every distractor starts like the asked key
    plain = tiny.niah_sample(random.Random(5), "niah_multikey_2", 40, [])
    assert tiny.niah_sample(random.Random(5), "niah_multikey_2", 40, [], hard_keys=0.0).prompt == plain.prompt
    with pytest.raises(ValueError, match="hard_keys"):
        tiny.Stage(steps=1, min_len=8, max_len=8, batch_size=1, hard_keys=1.5)
    assert all(st.hard_keys == 0.5 for st in tiny.configure_stages(tiny.RETRIEVAL, hard_keys=0.5))
    with pytest.raises(ValueError, match="--hard-keys requires"):
        tiny.train_tiny_main(["--hard-keys", "2", "--out-dir", "/nonexistent"])


def test_pose_prob_reaches_every_stage_but_the_copy_warm_up_and_skips_positions():
    from longctx.tiny.data import SampleStream, make_batch

    stages = tiny.configure_stages(tiny.CURRICULUM, pose_prob=1.0)
    assert [st.pose_prob for st in stages] == [0.0] + [1.0] * (len(stages) - 1)  # stage 0 is copy only
    assert [st.pose_prob for st in tiny.configure_stages(tiny.RETRIEVAL)] == [0.2, 0.0]  # unchanged when not given
    with pytest.raises(ValueError, match="pose_prob"):
        tiny.Stage(steps=1, min_len=8, max_len=8, batch_size=1, pose_prob=-0.1)
    for argv, message in ((["--pose-prob", "1.5"], "--pose-prob requires"),
                          (["--pose-max-position", "1"], "--pose-max-position requires")):
        with pytest.raises(ValueError, match=message):
            tiny.train_tiny_main([*argv, "--out-dir", "/nonexistent"])
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    stream = SampleStream(tok, seed=3, essay_words=tiny.load_essay_words()[:2000], mix=(("niah_single_1", 1.0),))
    _, _, pos = make_batch(stream, 4, 200, 300, 1.0, 16384, tok.pad_token_id)
    steps = pos[:, 1:] - pos[:, :-1]
    assert ((steps != 1).sum(dim=1) == 1).all()  # one skip per sequence
    assert int(pos.max()) < 16384 and int(steps.max()) > 1


def test_insert_identity_layer_keeps_the_outputs_and_trains(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.tiny import insert_identity_layer, supervised_heads

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        before = model(ids).logits
    old_last = model.model.layers[-1]
    heads = supervised_heads(model.config)
    insert_identity_layer(model, 2)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert model.model.layers[-1] is old_last and supervised_heads(model.config)["match"] == (4, heads["match"][1])
    assert [lay.self_attn.layer_idx for lay in model.model.layers] == list(range(5))
    with torch.no_grad():
        after = model(ids).logits
        cached = model.generate(ids[:1, :10], max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(after, before)
    assert cached.shape == (1, 15)
    # the new layer learns: its zeroed projections get gradients
    model.train()
    model(ids, labels=ids).loss.backward()
    new = model.model.layers[2]
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0
    # and the grown model saves and loads as a plain Llama
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, after)
    with pytest.raises(ValueError, match="at=6"):
        insert_identity_layer(model, 6)


def test_widen_model_keeps_the_outputs_and_trains(tmp_path):
    """Widening the residual stream and MLP leaves the logits (and cached generation) unchanged,
    every new weight gets a gradient, and the result saves and loads as a plain Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longctx.tiny import supervised_heads, widen_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # trained-like norm gains, not all ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        before = model(ids).logits
        gen_before = model.generate(ids[:1, :10], max_new_tokens=6, do_sample=False)
    heads = supervised_heads(model.config)
    widen_model(model, hidden_size=48, intermediate_size=96, seed=1)
    assert model.config.hidden_size == 48 and model.config.intermediate_size == 96
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert supervised_heads(model.config) == heads
    with torch.no_grad():
        after = model(ids).logits
        gen_after = model.generate(ids[:1, :10], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen_after, gen_before)
    model.train()
    model(ids, labels=ids).loss.backward()
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.weight.grad[32:].abs().sum() > 0  # new residual rows
    assert layer.mlp.down_proj.weight.grad[:, 64:].abs().sum() > 0  # new MLP units
    assert model.model.embed_tokens.weight.grad[:, 32:].abs().sum() > 0
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, after)
    with pytest.raises(ValueError, match="hidden_size >= 48"):
        widen_model(model, hidden_size=32)


def test_widen_flag_requires_init_from_and_two_sizes(tmp_path):
    from longctx.tiny import train_tiny_main

    with pytest.raises(ValueError, match="--widen requires --init-from"):
        train_tiny_main(["--out-dir", str(tmp_path), "--widen", "256,768", "--retrieval-only"])
    with pytest.raises(ValueError, match="HIDDEN,INTERMEDIATE"):
        train_tiny_main(["--out-dir", str(tmp_path), "--widen", "256", "--init-from", str(tmp_path)])


def _small_llama(rope_parameters=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
                      rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 1e4})
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("rope", [
    {"rope_theta": 1e6},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "attention_factor": 1.0},
])
def test_set_rope_matches_a_model_built_with_that_rope_and_saves(tmp_path, rope):
    """After set_rope the model computes what a model configured with that RoPE from the start
    computes (same weights), differs from before on long inputs, and saves / loads with it."""
    from transformers import LlamaForCausalLM

    from longctx.tiny import set_rope

    torch.manual_seed(0)
    model = _small_llama()
    ids = torch.randint(0, 97, (1, 600))
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    with torch.no_grad():
        before = model(ids).logits
    new = set_rope(model, rope)
    assert not torch.allclose(model.model.rotary_emb.inv_freq, inv_freq)
    assert new["rope_theta"] == rope.get("rope_theta", 1e4) and new["rope_type"] == rope.get("rope_type", "default")
    reference = _small_llama(rope_parameters=new)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        after = model(ids).logits
        torch.testing.assert_close(after, reference(ids).logits)
    assert not torch.allclose(after, before)  # the rotation really changed
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.rope_parameters["rope_type"] == new["rope_type"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, after)


def test_set_rope_takes_json_integers_for_float_fields():
    from longctx.tiny import set_rope

    new = set_rope(_small_llama(), {"rope_type": "yarn", "rope_theta": 100000, "factor": 8,
                                    "original_max_position_embeddings": 256, "attention_factor": 1})
    assert [type(new[k]) for k in ("rope_theta", "factor", "attention_factor")] == [float, float, float]
    assert type(new["original_max_position_embeddings"]) is int


def test_set_rope_rejects_bad_parameters_and_keeps_the_old_rope():
    from longctx.tiny import set_rope

    model = _small_llama()
    with pytest.raises(ValueError, match="rope_parameters as a dict"):
        set_rope(model, "1e9")
    with pytest.raises(ValueError, match="set_rope requires rope parameters"):
        set_rope(model, {"rope_type": "yarn"})  # yarn needs a factor
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e4}


def test_rope_flag_requires_init_from_and_json(tmp_path):
    from longctx.tiny import train_tiny_main

    with pytest.raises(ValueError, match="--rope requires --init-from"):
        train_tiny_main(["--out-dir", str(tmp_path), "--rope", '{"rope_theta": 1e9}', "--retrieval-only"])
    with pytest.raises(ValueError, match="JSON object"):
        train_tiny_main(["--out-dir", str(tmp_path), "--rope", "1e9", "--init-from", str(tmp_path)])


def test_insert_layer_flag_requires_init_from(tmp_path):
    from longctx.tiny import train_tiny_main

    with pytest.raises(ValueError, match="--insert-layer requires --init-from"):
        train_tiny_main(["--out-dir", str(tmp_path), "--insert-layer", "2", "--retrieval-only"])


def test_add_word_tokens_makes_hyphenated_nouns_whole_and_leaves_other_text(tmp_path):
    """Listed words become single tokens after a hyphen; essay text, numbers, uuids and every old
    id keep their tokenization; the grown tokenizer saves and loads; a second call adds nothing."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    old = AutoTokenizer.from_pretrained(TARGET)
    nouns = ["dinosaur", "seminar", "ownership", "lettuce"]
    grown = tiny.add_word_tokens(old, nouns + ["dinosaur", ""])
    assert len(grown) == len(old) + 4
    key = " fluffy-dinosaur"
    assert grown.convert_ids_to_tokens(grown(key, add_special_tokens=False).input_ids)[-2:] == ["-", "dinosaur"]
    assert len(old(key, add_special_tokens=False).input_ids) > len(grown(key, add_special_tokens=False).input_ids)
    essay = " ".join(tiny.load_essay_words()[:3000])
    other = f"{essay} The grass is green. 1234567 {uuid.UUID(int=random.Random(3).getrandbits(128), version=4)}"
    assert grown(other).input_ids == old(other).input_ids
    assert grown(" the dinosaur").input_ids == old(" the dinosaur").input_ids  # after a space: unchanged
    tiny.save_model(tiny.build_model(tiny.MODEL_CONFIGS["draft"], grown, seed=0), grown, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(key + " is: 42.").input_ids == grown(key + " is: 42.").input_ids
    assert len(tiny.add_word_tokens(loaded, nouns)) == len(loaded)  # idempotent
    spaced = tiny.add_word_tokens(old, [" fluffy", "dinosaur"])  # a leading space: the spaced form
    assert spaced.convert_ids_to_tokens(spaced(key, add_special_tokens=False).input_ids) == ["\u0120fluffy", "-",
                                                                                            "dinosaur"]
    assert len(tiny.WORD_TOKEN_LISTS["keys"]) > len(tiny.WORD_TOKEN_LISTS["nouns"]) > 6000
    with pytest.raises(ValueError, match="add_word_tokens requires a BPE tokenizer"):
        tiny.add_word_tokens(PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}))), nouns)


def test_grow_embeddings_keeps_old_tokens_and_draws_distinct_new_rows():
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    model = tiny.build_model(cfg, tok, seed=0).eval()
    ids = torch.randint(3, len(tok), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    old = model.get_input_embeddings().weight.detach().clone()
    assert tiny.grow_embeddings(model, len(tok) + 50, seed=3) == 50
    emb = model.get_input_embeddings().weight
    assert emb.shape == (len(tok) + 50, 64) and model.config.vocab_size == len(tok) + 50
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # still tied
    torch.testing.assert_close(emb[: len(tok)], old)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after[..., : len(tok)], before)
    new = torch.nn.functional.normalize(emb[len(tok):].detach(), dim=-1)
    cos = new @ new.T - torch.eye(50)
    assert cos.abs().max() < 0.8  # as far apart as random directions, not near-copies of the mean
    torch.testing.assert_close(emb[len(tok):].std(0), old.std(0), rtol=0.4, atol=0.0)
    assert tiny.grow_embeddings(model, len(tok) + 50) == 0
    with pytest.raises(ValueError, match="vocab_size >= the model's"):
        tiny.grow_embeddings(model, 10)


def test_grow_embeddings_near_starts_each_new_row_at_its_neighbour():
    """With ``near`` each new row is its neighbour's row plus ``spread`` times the noise: closest to
    that neighbour among the old rows, distinct from its siblings; bad ``near`` / ``spread`` refused."""
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    model = tiny.build_model(cfg, tok, seed=0)
    old = model.get_input_embeddings().weight.detach().clone()
    near = torch.randint(3, len(tok), (40,), generator=torch.Generator().manual_seed(2)).tolist()
    near[1] = near[0]
    with pytest.raises(ValueError, match="one existing token id"):
        tiny.grow_embeddings(model, len(tok) + 40, near=near[:-1])
    with pytest.raises(ValueError, match="spread > 0"):
        tiny.grow_embeddings(model, len(tok) + 40, near=near, spread=0.0)
    assert tiny.grow_embeddings(model, len(tok) + 40, seed=4, near=near, spread=0.3) == 40
    new = model.get_input_embeddings().weight[len(tok):].detach()
    assert torch.cdist(new, old).argmin(-1).tolist() == near
    offset = new - old[near]
    assert (offset.std(0) / old.std(0)).mean().item() == pytest.approx(0.3, rel=0.25)
    assert not torch.allclose(new[0], new[1])


def test_loss_reads_the_lm_head_only_where_labelled():
    """``_loss`` keeps only the positions whose next token is labelled; the loss is the same as
    the per-sequence mean over the full logits."""
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    model = tiny.build_model(cfg, tok, seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, len(tok), (2, 30), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 20:25] = ids[0, 20:25]
    labels[1, 5:8] = ids[1, 5:8]
    pos = torch.arange(30).repeat(2, 1)
    loss, _, _, per_seq = tiny._loss(model, ids, labels, pos, autocast=False)
    logits = model(ids, position_ids=pos).logits[:, :-1]
    full = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                             reduction="none")
    want = torch.stack([full[0, 19:24].mean(), full[1, 4:7].mean()])
    torch.testing.assert_close(per_seq, want.detach())
    torch.testing.assert_close(loss, want.mean())


def test_word_tokens_flag_grows_an_initial_checkpoint(tmp_path):
    """``train-tiny --init-from D --word-tokens nouns``: the saved target has the grown vocabulary
    and a key's noun is one token."""
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    tiny.save_model(tiny.build_model(cfg, tok, seed=0), tok, tmp_path / "init" / "tiny-target")
    rc = tiny.train_tiny_main(["--models", "target", "--init-from", str(tmp_path / "init"), "--word-tokens", "nouns",
                               "--retrieval-only", "--stage-steps", "1,1", "--out-dir", str(tmp_path / "out"),
                               "--eval-lengths", ""])
    assert rc == 0
    grown = AutoTokenizer.from_pretrained(tmp_path / "out" / "tiny-target")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "tiny-target")
    assert len(grown) > len(tok) + 1000 and model.config.vocab_size == len(grown)
    assert grown.convert_ids_to_tokens(grown(" cold-dinosaur", add_special_tokens=False).input_ids)[-1] == "dinosaur"


def test_group_digits_spells_numbers_in_groups_and_leaves_other_text(tmp_path):
    """Numbers outside uuids become groups of up to 3 digits; uuids, essay and noise text and
    every old id keep their tokenization; the tokenizer saves, loads and round-trips; bad sizes
    and regrouping are refused."""
    old = AutoTokenizer.from_pretrained(TARGET)
    grown = tiny.group_digits(old, 3)
    assert len(grown) == len(old) + 1100 and tiny.digit_group_size(grown) == 3 and tiny.digit_group_size(old) == 1
    assert tiny.splits_uuid_hex(grown)
    rng = random.Random(5)
    value = str(rng.randint(10**6, 10**7 - 1))
    assert grown.convert_ids_to_tokens(grown(f"is: {value}.", add_special_tokens=False).input_ids)[-4:] == [
        value[:3], value[3:6], value[6], "."]
    assert grown.convert_ids_to_tokens(grown("VAR X = 12345", add_special_tokens=False).input_ids)[-2:] == ["123", "45"]
    uuids = " ".join(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(20))
    essay = " ".join(tiny.load_essay_words()[:3000])
    other = f"{essay} {tiny.NOISE_LINE} {uuids} 12345678-0000-4000-8000-123456789012 fluffy-dinosaur"
    assert grown(other).input_ids == old(other).input_ids
    texts = [str(rng.randint(0, 10**9)) for _ in range(30)] + [f"a{rng.randint(0, 999)}b 0{rng.randint(0, 99)}."]
    for text in texts:
        assert grown.decode(grown(text).input_ids, skip_special_tokens=True) == text
    tiny.save_model(tiny.build_model(tiny.MODEL_CONFIGS["draft"], grown, seed=0), grown, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(f"{other} {value}").input_ids == grown(f"{other} {value}").input_ids
    assert tiny.group_digits(loaded, 3) is loaded  # idempotent
    stream = tiny.SampleStream(grown, seed=0, essay_words=tiny.load_essay_words()[:2000])
    assert len(stream.digit_ids) == 1110 and grown.convert_tokens_to_ids("907") in stream.digit_ids
    with pytest.raises(ValueError, match="already groups digits by 3"):
        tiny.group_digits(grown, 2)
    with pytest.raises(ValueError, match="size to be an int in 2..4"):
        tiny.group_digits(old, 5)


def test_digit_groups_flag_grows_an_initial_checkpoint(tmp_path):
    """``train-tiny --init-from D --digit-groups 3 --digit-init first``: the saved target has the grown
    vocabulary, spells a 7-digit value in three tokens and starts each group at its first digit."""
    tok = tiny.build_tokenizer(vocab_size=400, essay_words=tiny.load_essay_words()[:5000])
    cfg = tiny.TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
    tiny.save_model(tiny.build_model(cfg, tok, seed=0), tok, tmp_path / "init" / "tiny-target")
    rc = tiny.train_tiny_main(["--models", "target", "--init-from", str(tmp_path / "init"), "--digit-groups", "3",
                               "--digit-init", "first", "--retrieval-only", "--stage-steps", "1,1",
                               "--out-dir", str(tmp_path / "out"), "--eval-lengths", ""])
    assert rc == 0
    grown = AutoTokenizer.from_pretrained(tmp_path / "out" / "tiny-target")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "tiny-target")
    assert len(grown) == len(tok) + 1100 and model.config.vocab_size == len(grown)
    assert grown.convert_ids_to_tokens(grown("1234567", add_special_tokens=False).input_ids) == ["123", "456", "7"]
    with pytest.raises(ValueError, match="--digit-init first requires --digit-groups 2..4 and --init-from"):
        tiny.train_tiny_main(["--models", "target", "--digit-init", "first", "--retrieval-only",
                              "--out-dir", str(tmp_path / "bad"), "--eval-lengths", ""])
    emb = model.get_input_embeddings().weight.detach()  # --digit-init first: a group starts at its first digit
    groups = grown.convert_tokens_to_ids(["123", "456", "07"])
    assert torch.cdist(emb[groups], emb[: len(tok)]).argmin(-1).tolist() == grown.convert_tokens_to_ids(["1", "4", "0"])
