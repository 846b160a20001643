"""Tests for the answer grader (the single path behind the RL reward and benchmark accuracy)."""
import json
import random
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from eval import extract_answer, grade, strip_special  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "d1_generations"  # vendored: README there
GSM_FILE = FIXTURES / "gsm8k_instruct_256_128_0_generations.json"
MATH_FILE = FIXTURES / "math500_instruct_256_128_0_generations.json"


def boxed(s):
    return "<reasoning>work</reasoning>\n<answer>\n\\boxed{" + s + "}\n</answer><|eot_id|><|endoftext|>"


# ---------------------------------------------------------------- extraction

def test_strip_special_removes_every_pipe_token_and_keeps_text():
    raw = "<|start_header_id|>a<|mdm_mask|>b <c> <|eot_id|><|endoftext|><|endoftext|>"
    assert strip_special(raw) == "ab <c> "
    assert strip_special(None) == "" and strip_special(0) == "0"


@pytest.mark.parametrize("text, expected", [
    ("first \\boxed{3} then \\boxed{18}<|eot_id|>", "18"),                 # last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                             # balanced braces
    ("\\boxed{\\boxed{5}}", "5"),                                          # innermost of a nest
    ("\\fbox{7}", "7"),
    ("so \\boxed 42$ done", "42"),                                         # brace-less form
    ("\\boxed{12} and a truncated \\boxed{1", "12"),                       # unclosed last box ignored
    ("\\boxed{9} then \\boxed{ }", "9"),                                   # empty box ignored
    ("<answer> 42 </answer>", "42"),                                       # no box: answer tags
    ("<answer>\\boxed{7}</answer> <answer>8</answer>", "7"),               # a box beats the tags
    ("<answer>3</answer> then <answer>42</answer>", "42"),                 # no box: the last answer tags
    ("blah\n#### 1,000\n", "1,000"),                                       # GSM8K reference style
    ("#### 3\nno, #### 5\n", "5"),                                          # the last '####'
    ("\\boxed{1<|mdm_mask|>8}", "18"),                                     # special tokens dropped first
    ("no answer in here, only 12 and 13", None),                          # no last-number fallback
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, gold, ok", [
    ("4+4=8\n<|eot_id|>8-4=4\n\\boxed{4}", "4", False),              # the box after the end is not read
    ("\\boxed{8}<|eot_id|><|endoftext|>\\boxed{4}", "8", True),         # the box before it is
    ("\\boxed{8}<|endoftext|>\\boxed{4}<|eot_id|>", "4", False),        # EOS ends a completion too
    ("<|eot_id|>\\boxed{4}", "4", False),
])
def test_grade_reads_only_up_to_the_first_end_token(text, gold, ok):
    """The reward reads what the loss trains on (igpo.py deviation 2): the text before the first end token."""
    assert grade(text, gold, "toy") is ok


def test_reward_and_loss_mask_see_the_same_tokens():
    from eval import completion_mask
    vocab = ["4+4=8\n", "<|eot_id|>", "\\boxed{8}", "<|endoftext|>"]  # a four-token stand-in tokenizer
    ids = torch.tensor([[0, 1, 2, 3]])
    seen = ids[completion_mask(ids, torch.tensor([1, 3]))]  # the tokens the loss is computed on
    decode = lambda t: "".join(vocab[i] for i in t.tolist())
    assert grade(decode(ids[0]), "8", "toy") is grade(decode(seen), "8", "toy") is False


# ---------------------------------------------------------------- numeric tasks

@pytest.mark.parametrize("pred, gold, ok", [
    ("18", "18.0", True), ("18", 18.0, True), ("\\$18.00", 18, True), ("18 dollars.", "18", True),
    ("1,000", 1000.0, True), ("1000", "1,000", True), ("5 \\times 3 = 15", 15, True),
    ("\\frac{7}{2}", "3.5", True), ("7/2", 3.5, True), ("0.3333333", "1/3", True), ("0", 0.0, True),
    ("-5", "5", False), ("17", 18.0, False), ("6,277", "6277", True), ("6,27", "627", False),
    ("18.5", 18, False), ("abc", 18, False),
])
@pytest.mark.parametrize("task", ["gsm8k", "toy"])
def test_numeric(pred, gold, ok, task):
    assert grade(boxed(pred), gold, task) is ok


# ---------------------------------------------------------------- LaTeX tasks

@pytest.mark.parametrize("pred, gold, ok", [
    ("0.5", "\\frac{1}{2}", True),        # decided: value equality, as MATH graders do
    ("\\frac34", "\\dfrac{3}{4}", True),
    ("\\sqrt2", "\\sqrt{2}", True), ("\\sqrt{20}", "2\\sqrt{5}", True), ("2", "\\sqrt{2}", False),
    ("1,000", "1000", True), ("18.90", "\\$18.90", True), ("x = 5", "5", True), ("10^\\circ", "10", True),
    ("(1, 2]", "(1,2]", True), ("(1,2)", "[1,2)", False),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)", True),
    ("3, 7, 5", "3, 5, 7", True),          # a list of roots is a set
    ("(x+1)^2", "x^2+2x+1", True), ("\\frac{3}{24}", "\\frac{1}{8}", True), ("\\pi", "3.14", False),
    ("\\text{(C)}", "C", True), ("12", "13", False), ("9^{9^9}", "9^9^9", False),
])
@pytest.mark.parametrize("task", ["math500", "amc", "minerva"])
def test_latex(pred, gold, ok, task):
    assert grade(boxed(pred), gold, task) is ok


def test_numeric_gold_for_latex_task():
    assert grade(boxed("27"), 27.0, "amc") and grade(boxed("0"), 0, "amc")


def test_unknown_task_raises_one_line_error():
    with pytest.raises(ValueError, match="gsm8K|unknown task 'gsm8K'") as err:
        grade("\\boxed{1}", "1", "gsm8K")
    assert "\n" not in str(err.value)


def test_works_off_the_main_thread():
    # math_verify's SIGALRM timeouts would raise here; ours must not depend on signals.
    out = {}

    def run():
        out["yes"] = grade(boxed("0.5"), "\\frac{1}{2}", "math500")
        out["no"] = grade(boxed("0.6"), "\\frac{1}{2}", "math500")
        start = time.monotonic()
        out["slow"] = grade(boxed("(a+b)(c+d)(e+f)(g+h)(i+j)(k+l)(m+n)(o+p)(q+r)(s+t)"), "\\frac12", "math500")
        out["slow_s"] = time.monotonic() - start

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    assert out["yes"] is True and out["no"] is False
    assert out["slow"] is False and out["slow_s"] < 5  # sympy needs >5 s here unguarded


# ---------------------------------------------------------------- hostile inputs

NASTY = [
    "", None, "\\boxed{", "}}}}{{{", "\\boxed{}", "\\boxed{\\boxed{}}", "\\boxed{" * 1000 + "1" + "}" * 1000,
    "\\boxed{" * 20000 + "}" * 20000, "x" * 100_000, "\\text{" * 20000, "\\boxed{" + "9" * 100_000 + "}",
    "#### " + "9" * 5000, "<answer>" + "1," * 20000 + "</answer>", "\U0001F600\x00\x07\u202e\\boxed{\u00bd}",
    "\\boxed{9^9^9}", "\\boxed{10^{10^{10}}}", "\\boxed{2**99999999}", "\\boxed{(10^{999})^{999}}", "\\boxed 9^9^9$",
    "\\boxed{99999!}", "\\boxed{(9^9)!}", "\\boxed{\\binom{10^{9}}{10^{8}}}", "\\boxed{1e999999999}",
    "\\boxed{\\sum_{k=1}^{999999} k}", "\\boxed{x^{x^{x}}}", "\\boxed{(x+1)^{999}}",
    "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}", "\\boxed{" + "(" * 500 + "1" + ")" * 500 + "}",
    "\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(60)) + "}",
]


def _random_nasty(n, seed=0):
    rng = random.Random(seed)
    parts = ["\\boxed{", "{", "}", "^", "**", "9", "99", "\\frac", "\\sqrt", "!", "(", ")", "x", "=", "\u00e9",
             "\U0001F4A9", " ", ",", ".", "\\left(", "<answer>", "</answer>", "####", "<|eot_id|>", "\\", "$"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.mark.parametrize("text", NASTY + _random_nasty(80), ids=lambda s: repr(s)[:30])
def test_hostile_input_is_bounded(text):
    for gold, task in [("\\frac{1}{2}", "math500"), ("18", "gsm8k"), ("9^9^9", "minerva")]:
        start = time.monotonic()
        result = grade(text, gold, task)
        assert isinstance(result, bool)
        assert time.monotonic() - start < 5
    start = time.monotonic()
    extract_answer(text)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------- real LLaDA generations vs d1's parser
# Independent re-statement of d1's eval/parse_and_get_acc.py (GSM8K: first \boxed{...} up to the
# first "}" read as float, else last number inside <answer></answer>; MATH: Hendrycks-style
# last_boxed_only_string + remove_boxed + string normalisation in is_equiv).

def d1_gsm(text, gold):
    value = None
    for inner in re.findall(r"\\boxed{(.*?)}", text):
        inner = inner.strip()
        if not inner or re.fullmatch(r"\.+", inner):
            continue
        try:
            value = float(inner)
        except ValueError:
            nums = re.findall(r"-?\d+\.?\d*", inner)
            value = float(nums[0]) if nums else None
        if value is not None:
            break
    if value is None:
        m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        body = m.group(1).strip() if m else ""
        nums = re.findall(r"-?\d+\.?\d*", body)
        if body:
            try:
                value = float(body)
            except ValueError:
                value = float(nums[-1]) if nums else None
    return value is not None and value == gold


def _d1_last_box(s):
    if "\\boxed " in s:
        return s.split("\\boxed ")[-1].split("$")[0]
    start = s.rfind("\\boxed")
    start = start if start >= 0 else s.rfind("\\fbox")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(s)):
        depth += (s[i] == "{") - (s[i] == "}")
        if s[i] == "}" and depth == 0:
            box = s[start:i + 1]
            return box[len("\\boxed{"):-1] if box.startswith("\\boxed{") else None
    return None


def _d1_norm(s):
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    for junk in ["\\left", "\\right", "^{\\circ}", "^\\circ", "\\$"]:
        s = s.replace(junk, "")
    if "\\text{ " in s:
        head, *rest = s.split("\\text{ ")
        if len(rest) != 1:
            raise ValueError("units")
        s = head
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt([^{])", r"\\sqrt{\1}", s).replace(" ", "")
    out = []
    for k, piece in enumerate(s.split("\\frac")):  # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}
        if k and piece[:1] != "{":
            if not piece:
                raise ValueError("dangling \\frac")  # d1 crashes here and falls back to raw equality
            if len(piece) < 2:
                return s
            piece = "{" + piece[0] + "}" + (piece[1:] if piece[1] == "{" else "{" + piece[1] + "}" + piece[2:])
        out.append(piece)
    s = "\\frac".join(out)
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    return "\\frac{%d}{%d}" % (int(m.group(1)), int(m.group(2))) if m and s == "%d/%d" % (int(m.group(1)), int(m.group(2))) else s


def d1_math(text, gold):
    pred = _d1_last_box(text)
    if not pred:
        m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        pred = m.group(1).strip() if m else pred
    if pred is None:
        return False
    try:
        return _d1_norm(pred) == _d1_norm(gold)
    except Exception:
        return pred == gold


def _items(path):
    return json.loads(path.read_text())["generations"]


# Every disagreement with d1 is one where d1 is wrong (listed in NOTES_grader.md):
GSM_JUSTIFIED = {34: "6,277", 127: "6,250", 129: "14,000", 202: "\\boxed{120\\n</answer}"}
MATH_JUSTIFIED = {11: "15.975 = 639/40", 24: "3/24 = 1/8", 37: "roots {3,7,5} = {3,5,7}"}


def test_gsm8k_fixture_matches_d1():
    items = _items(GSM_FILE)
    ref = [d1_gsm(x["generations"], x["ground_truth"]) for x in items]
    ours = [grade(x["generations"], x["ground_truth"], "gsm8k") for x in items]
    assert sum(ref) == 160  # our re-statement of d1 reproduces its published count
    assert sum(ours) == 164
    assert {i for i in range(len(items)) if ours[i] != ref[i]} == set(GSM_JUSTIFIED)
    assert all(ours[i] and not ref[i] for i in GSM_JUSTIFIED)


def test_math500_fixture_matches_d1():
    items = _items(MATH_FILE)
    ref = [d1_math(x["generations"], x["ground_truth"]) for x in items]
    ours = [grade(x["generations"], x["ground_truth"], "math500") for x in items]
    assert sum(ref) == 26
    assert sum(ours) == 29
    assert {i for i in range(len(items)) if ours[i] != ref[i]} == set(MATH_JUSTIFIED)
    assert all(ours[i] and not ref[i] for i in MATH_JUSTIFIED)


def test_deadline_counts_cpu_not_wall_time(monkeypatch):
    # A verify that waits 3 s without using CPU (as a starved thread on a busy machine does) must still be
    # allowed to answer: the 2 s deadline is on the worker's CPU time. A wall-clock deadline would say False.
    import math_verify
    grade(boxed("0.5"), "\\frac{1}{2}", "math500")  # warm the lazy imports first
    real_verify = math_verify.verify

    def slow_verify(*args, **kwargs):
        time.sleep(3)
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(math_verify, "verify", slow_verify)
    assert grade(boxed("0.5"), "\\frac{1}{2}", "math500") is True


# ---------------------------------------------------------------- eval.py --grade: saved results, no model

def test_grade_flag_regrades_d1s_layout(tmp_path):
    import eval as evaluation
    items = _items(GSM_FILE)
    evaluation.main(["--grade", str(GSM_FILE), "--task", "gsm8k", "--out_dir", str(tmp_path)])
    out = json.loads((tmp_path / "eval_gsm8k.json").read_text())
    assert out["metrics"] == {"accuracy": 164 / 205, "correct": 164, "total": 205, "task": "gsm8k"}
    assert [r["correct"] for r in out["generations"]] == [grade(x["generations"], x["ground_truth"], "gsm8k")
                                                          for x in items]
    assert (out["gen_length"], out["diffusion_steps"], out["graded"]) == (256, 128, str(GSM_FILE))


def test_grade_flag_regrades_our_layout_with_several_samples(tmp_path):
    import eval as evaluation
    saved = {"generations": [{"question": "a", "generations": ["\\boxed{5}", "\\boxed{4}"], "ground_truth": "5",
                              "correct": 0.0},
                             {"question": "b", "generations": "\\boxed{\\frac{1}{2}}", "ground_truth": "0.5",
                              "correct": 0.0}],
             "seed": 3, "metrics": {"accuracy": 0.0, "correct": 0.0, "total": 2, "task": "toy"}}
    (tmp_path / "saved.json").write_text(json.dumps(saved))
    evaluation.main(["--grade", str(tmp_path / "saved.json"), "--task", "math500", "--out_dir", str(tmp_path)])
    out = json.loads((tmp_path / "eval_math500.json").read_text())
    assert [r["correct"] for r in out["generations"]] == [0.5, 1.0] and out["seed"] == 3
    assert out["metrics"] == {"accuracy": 0.75, "correct": 1.5, "total": 2, "task": "math500"}


def test_grade_flag_never_overwrites_the_file_it_grades(tmp_path, monkeypatch):
    """`eval.py --grade out/eval_gsm8k.json --task gsm8k` would write its result onto the file it reads, by
    another path to the same file too: refused with one line, the file untouched."""
    import eval as evaluation
    (tmp_path / "out").mkdir()
    saved = tmp_path / "out" / "eval_gsm8k.json"
    saved.write_text(GSM_FILE.read_text())
    monkeypatch.chdir(tmp_path)
    for path, out_dir in ((str(saved), str(tmp_path / "out")), ("out/eval_gsm8k.json", str(tmp_path / "out")),
                          (str(saved), "out")):
        with pytest.raises(SystemExit) as e:
            evaluation.main(["--grade", path, "--task", "gsm8k", "--out_dir", out_dir])
        assert e.value.code == f"error: --grade {path} would be overwritten by its regrading: pass another --out_dir"
    assert saved.read_text() == GSM_FILE.read_text()


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"generations": [{"question": "q"}]}',
                                     '{"generations": [{"generations": [], "ground_truth": "1"}]}', None])
def test_grade_flag_refuses_what_is_not_a_results_file(tmp_path, content):
    import eval as evaluation
    path = tmp_path / "file.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--grade", str(path), "--out_dir", str(tmp_path / "out")])
    message = e.value.code
    assert message.startswith("error: ") and "\n" not in message and not (tmp_path / "out").exists()
    assert ("results file not found" if content is None else "is not a results file") in message, message
