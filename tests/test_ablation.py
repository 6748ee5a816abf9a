"""bench/ablation.py: the quick mode runs every stage end to end through the public CLIs, and the
report's comparisons call a difference within the seeds' spread no difference."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import ablation  # noqa: E402


def test_spread_overlap_is_no_difference():
    ref = ablation.Spread([0.50, 0.70])
    assert ablation.Spread([0.60, 0.90]).compare(ref) == 0  # ranges overlap: no difference
    assert ablation.Spread([0.75, 0.90]).compare(ref) == 1
    assert ablation.Spread([0.10, 0.45]).compare(ref) == -1
    assert ablation.Spread([0.9]).compare(ref) is None  # one seed has no range to compare
    row, reference = {"loss": ablation.Spread([2.0, 2.1])}, {"loss": ablation.Spread([2.5, 2.6])}
    assert ablation.verdict(row, reference, "loss", higher_is_better=False) == "better"
    assert ablation.verdict(row, reference, "loss", higher_is_better=True) == "worse"


def test_chance_tail_is_the_binomial_tail():
    assert abs(ablation.chance_tail(0, 20, 0.04) - 1.0) < 1e-12
    assert abs(ablation.chance_tail(1, 2, 0.5) - 0.75) < 1e-12
    assert abs(ablation.chance_tail(3, 3, 0.1) - 1e-3) < 1e-15
    # 4 of 40 at chance 1/25 is ordinary luck; 16 of 40 is not
    assert ablation.chance_tail(4, 40, 0.04) > 0.05 and ablation.chance_tail(16, 40, 0.04) < ablation.RETRIEVES


def test_retrieval_prompt_holds_the_letter_once_and_is_answered_by_one_token():
    import random
    import data
    import eval as evaluation
    tok = data.builtin_tokenizer()
    rng = random.Random(0)
    for length, depth in [(150, 0.0), (256, 0.5), (1024, 1.0)]:
        record, tokens = ablation.letter_sample(tok, length, depth, rng)
        letter, prompt = record["answers"][0], record["prompt"]
        assert len(tokens) + ablation.ANSWER_BUDGET == length and tokens[1:] == tok.encode(prompt)
        assert prompt.endswith("#") and len(tok.encode(letter)) == 1  # one token, read by the evaluation
        assert prompt.count("#" + letter) == 1 and prompt.count("#") == 2  # the needle's "#", the question's
        noise = prompt.replace(ablation.NEEDLE.format(letter=letter), "", 1).replace(ablation.QUESTION, "")
        assert not any(c.isupper() or c == "#" for c in noise)  # the needle is the only capital letter to find
    # exact match (SQuAD normalisation: no articles) tells every letter from an empty or wrong answer
    for letter in ablation.LETTERS:
        assert evaluation.exact_match(letter, [letter]) and not evaluation.exact_match("", [letter]), letter
        assert not evaluation.exact_match("Q" if letter != "Q" else "R", [letter])


def test_retrieval_records_train_the_letter_alone(tmp_path):
    """sft.py's labels on a retrieval record: the letter and nothing else (no end token)."""
    import data, sft
    tok = data.builtin_tokenizer()
    path = str(tmp_path / "retrieval.jsonl")
    ablation.write_retrieval_records(path, 6, window=256)
    records = [json.loads(line) for line in open(path)]
    dataset = sft.ChatDataset([(path, 1.0)], tok, 256, log=None)
    labels = [label for i in range(len(dataset)) for label in dataset[i]["labels"].tolist() if label != -100]
    assert labels == [tok.encode(records[k]["completion"])[0] for k in dataset.blend.tolist()]


def test_quick_ablation_runs_every_stage(tmp_path):
    out = tmp_path / "ablation"
    result = subprocess.run([sys.executable, os.path.join("bench", "ablation.py"), "--quick", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scale = ablation.QUICK

    summary = json.loads((out / "results.json").read_text())
    assert set(summary["table"]) == {v.name for v in ablation.VARIANTS}
    for name, row in summary["table"].items():
        for key, figure in row.items():
            assert len(figure["values"]) == len(scale.seeds) and all(math.isfinite(x) for x in figure["values"]), \
                (name, key)
            if key.startswith("niah@"):
                assert 0 <= figure["min"] <= figure["max"] <= 1, (name, key)
    report = (out / "report.md").read_text()
    for v in ablation.VARIANTS:
        assert f"| {v.label} |" in report
    try:  # matplotlib is optional (requirements-test.txt installs it); without it no PNG is drawn
        import matplotlib  # noqa: F401
        for png in ("loss_by_position.png", "niah_by_length.png"):
            assert (out / png).stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in result.stdout

    # the scalings were applied relative to the base's window, zero-shot and after stage 1
    def config(name):
        return json.loads((out / "models" / name / "hf" / "config.json").read_text())
    assert config("base")["max_position_embeddings"] == scale.window
    for name in ("base+yarn", "yarn-seed0", "yarn-2step-seed0"):
        assert config(name)["rope_scaling"]["factor"] == scale.factor
        assert config(name)["rope_scaling"]["original_max_position_embeddings"] == scale.window
        assert config(name)["max_position_embeddings"] == scale.ctx
    assert config("yarn-2step-seed0-step1")["max_position_embeddings"] == scale.window * scale.two_step_first
    assert config("base+ntk")["rope_theta"] > config("base")["rope_theta"]
    assert config("none-seed0")["rope_theta"] == config("base")["rope_theta"]
    assert config("none-seed0")["rope_scaling"] is None

    # every stage-1 variant trained on the same number of tokens (the two steps together), then
    # stage 2 kept its scaling and window
    def tokens(name):
        with open(out / "models" / name / "metrics.jsonl") as f:
            return sum(json.loads(line)["tokens"] for line in f)
    assert tokens("yarn-2step-seed0-step1") + tokens("yarn-2step-seed0-stage1") == scale.stage1_tokens
    for v in ablation.VARIANTS:
        if v.stage1 is not None and not v.two_step:
            assert tokens(f"{v.name}-seed0-stage1") == scale.stage1_tokens, v.name
        if v.stage1 is not None:
            assert config(f"{v.name}-seed0") == config(f"{v.name}-seed0-stage1"), v.name
    commands = (out / "commands.sh").read_text()
    assert "--separator bos" in commands and "--doc-mask" in commands and "--rope ntk" in commands
