"""Benchmark readers on small files in each published schema (written here), and each official scorer's behaviour on
tricky predictions. Every expected verdict is what the official code does; the comment names the file read:

- MathVista: lupantech/MathVista evaluation/calculate_score.py (normalize_extracted_answer, get_most_similar,
  safe_equal) and evaluation/extract_answer.py (its rule steps before the GPT call);
- MATH-Vision: mathllm/MATH-V evaluation/evaluate.py and evaluation/utils.py (find_math_answer, is_equal);
- We-Math: We-Math/We-Math evaluation/four_dimensional_metrics.py and evaluation/accuracy.py;
- LogicVista: Yijia-Xiao/LogicVista eval/extract_accuracy.py (its README calls it extract_accuracy_new.py) and
  eval/analyze_accuracy.py;
- MathVerse: ZrrSkywalker/MathVerse evaluation/score_answer_s2.py (quick_match; the GPT judge is approximated);
- VLMEvalKit: open-compass/VLMEvalKit vlmeval/dataset/image_base.py (base64 images, short index references; the
  question sent as it is), image_mcq.py (WeMath.build_prompt) and utils/{mathvista,mathv,mathverse,logicvista,wemath}.py
  (the columns each scorer reads);
- prompts: MathVista evaluation/build_query.py (= data/query.json), MATH-V models/GPT4.py and models/Qwen-VL.py
  (geninput), We-Math's template as VLMEvalKit's WeMath.tsv carries it (vlmeval/vlm/internvl/utils.py).
"""

import base64
import io
import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from deltakit.benchmarks import get, load, score_one
from deltakit.benchmarks import mathcheck
from deltakit.benchmarks.mathvision import find_math_answer, is_equal, model_answer
from deltakit.benchmarks.mathvista import normalize_extracted_answer
from deltakit.benchmarks.wemath import four_dimensional, processed_answer
from deltakit.data import DataError


def png(color: tuple[int, int, int], size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def verdicts(bench, items, predictions, lenient=False):
    by_id = {it.id: it for it in items}
    return {k: score_one(bench, by_id[k], v, lenient) for k, v in predictions.items()}


# --- MathVista -------------------------------------------------------------------------------------------------

def mathvista_rows():
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school", "language": "english",
            "skills": ["geometry reasoning", "algebraic reasoning"], "source": "Geometry3K", "split": "testmini", "task": "geometry problem solving"}
    base = {"unit": None, "precision": None, "metadata": meta, "image": "images/x.png",
            "decoded_image": {"bytes": png((200, 0, 0)), "path": "x.png"}}
    return [
        {**base, "pid": "1", "question": "Which angle?", "choices": ["120", "145", "160"], "answer": "145",
         "question_type": "multi_choice", "answer_type": "text", "query": "Hint: choose.\nQuestion: Which angle?\nChoices:\n(A) 120\n(B) 145\n(C) 160"},
        {**base, "pid": "2", "question": "Which shape?", "choices": ["circles", "square"], "answer": "circles",
         "question_type": "multi_choice", "answer_type": "text", "query": "Which shape?"},
        {**base, "pid": "3", "question": "How many?", "choices": None, "answer": "3", "question_type": "free_form",
         "answer_type": "integer", "query": "How many?"},
        {**base, "pid": "4", "question": "Length?", "choices": None, "answer": "1.3", "precision": 1.0,
         "question_type": "free_form", "answer_type": "float", "unit": "cm", "query": "Length?"},
        {**base, "pid": "5", "question": "Ratio?", "choices": None, "answer": "2.67", "precision": 2.0,
         "question_type": "free_form", "answer_type": "float", "query": "Ratio?"},
        {**base, "pid": "6", "question": "Count?", "choices": None, "answer": "1000", "question_type": "free_form",
         "answer_type": "integer", "query": "Count?"},
    ]


def test_mathvista_parquet_and_official_rules(tmp_path):
    path = write_parquet(tmp_path / "testmini.parquet", mathvista_rows())
    bench, items = load(path)
    assert bench.name == "mathvista" and [i.id for i in items] == ["1", "2", "3", "4", "5", "6"]
    assert items[0].prompt.startswith("Hint: choose.")  # MathVista's own `query` is the prompt
    assert items[0].images[0].open().size == (8, 6)  # decoded_image bytes, not the (absent) images/x.png
    assert items[0].groups["skills"] == ["geometry reasoning", "algebraic reasoning"]
    v = verdicts(bench, items, {
        "1": "I think (b) is right: \\boxed{(B)}",  # "(B)" -> letter B -> "145" (normalize_extracted_answer)
        "2": "circle",  # no letter: the nearest choice by edit distance, "circles" (get_most_similar)
        "3": "3.7",  # integer: str(int(float("3.7"))) = "3" -- truncated, so right
        "4": "\\boxed{1.25}",  # float: str(round(1.25, 1)) = "1.2" (binary 1.25 rounds down) != "1.3"
        "5": "The answer is \"2.675\".",  # the quick-extract rule; round(2.675, 2) = 2.67 == "2.67"
        "6": "\\boxed{1,000}",  # int(float("1,000")) raises -> None -> wrong, not a crash
    })
    assert {k: (r["extracted"], r["correct"]) for k, r in v.items()} == {
        "1": ("(B)", True), "2": ("circle", True), "3": ("3.7", True), "4": ("1.25", False), "5": ("2.675", True),
        "6": ("1,000", False)}


def test_mathvista_empty_answer_takes_the_nearest_choice():
    # calculate_score.py with ignore_empty_extractions=False (its default): "" is nearest the shortest choice.
    assert normalize_extracted_answer("", ["square", "cone"], "multi_choice", "text", None) == "cone"
    assert normalize_extracted_answer("E", ["a", "b"], "multi_choice", "text", None) == "a"  # not a letter: nearest
    assert normalize_extracted_answer("nan", None, "free_form", "float", 2) == "nan"  # float("nan") parses: str(round(nan, 2))
    assert normalize_extracted_answer("1e2", None, "free_form", "integer", None) == "100"  # int(float("1e2"))
    assert normalize_extracted_answer("7", None, "free_form", "float", None) is None  # int(None) raises


def test_mathvista_github_json_with_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(png((0, 0, 200)))
    rec = {k: v for k, v in mathvista_rows()[2].items() if k != "decoded_image"} | {"image": "images/1.png"}
    (tmp_path / "testmini.json").write_text(json.dumps({"3": rec}))
    bench, [item] = load(tmp_path / "testmini.json")
    assert bench.name == "mathvista" and item.id == "3" and item.images[0].open().getpixel((0, 0)) == (0, 0, 200)
    # extract_answer.py: an answer that parses as int is taken as it is
    assert score_one(bench, item, "3")["correct"] and not score_one(bench, item, "three")["correct"]


def test_lenient_is_beside_official(tmp_path):
    path = write_parquet(tmp_path / "testmini.parquet", mathvista_rows())
    bench, items = load(path)
    row = verdicts(bench, items, {"4": "\\boxed{1.3 cm}", "3": "\\boxed{\\frac{9}{3}}"}, lenient=True)
    # official: float("1.3 cm") and float("\frac{9}{3}") fail -> None -> wrong; lenient: units stripped, math-verify
    assert [(r["correct"], r["lenient_correct"]) for r in row.values()] == [(False, True), (False, True)]
    assert verdicts(bench, items, {"3": "\\boxed{3}"})["3"]["lenient_correct"] is None  # not asked: not computed


def test_mathvista_query_built_as_published(tmp_path):
    # The GitHub testmini.json has no `query` (it is in data/query.json); build_query.py's create_one_query
    # (zero-shot, no caption/OCR) gives it. Expected strings: data/query.json for pids 2 and 5, verbatim.
    recs = {"2": {"question": "what is the total volume of the measuring cup?", "image": "images/2.jpg", "choices": None,
                  "unit": "g", "precision": None, "answer": "1000", "question_type": "free_form", "answer_type": "integer",
                  "pid": "2", "metadata": {"task": "figure question answering"}},
            "5": {"question": "Find $m\\angle H$", "image": "images/5.jpg", "choices": ["97", "102", "107", "122"],
                  "unit": None, "precision": None, "answer": "97", "question_type": "multi_choice", "answer_type": "text",
                  "pid": "5", "metadata": {"task": "geometry problem solving"}},
            "9": {"question": "Ratio?", "image": "images/5.jpg", "choices": None, "unit": None, "precision": 2.0,
                  "answer": "0.67", "question_type": "free_form", "answer_type": "float", "pid": "9", "metadata": {}}}
    (tmp_path / "images").mkdir()
    for name in ("2.jpg", "5.jpg"):
        (tmp_path / "images" / name).write_bytes(png((1, 1, 1)))
    (tmp_path / "testmini.json").write_text(json.dumps(recs))
    bench, items = load(tmp_path / "testmini.json")
    assert bench.name == "mathvista" and [i.prompt for i in items] == [
        ("Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.\n"
         "Question: what is the total volume of the measuring cup? (Unit: g)"),
        ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
         "Question: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122"),
        ("Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final "
         "value, e.g., 1.23, 1.34, 1.45, at the end.\nQuestion: Ratio?")]


# --- MATH-Vision -----------------------------------------------------------------------------------------------

def test_mathvision_rules():
    # evaluate.py: " (C)." at the end -> "C"; find_math_answer lower-cases; is_equal lower-cases both
    assert model_answer("Looking at the figure, the answer is (C).") == "c"
    assert is_equal("C", model_answer("Looking at the figure, the answer is (C)."))
    # the greedy 'oxed{(.*)}' and the "count > 1" rewrite keep the last box
    assert model_answer("first \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert is_equal("0.5", "\\frac{1}{2}")  # latex2sympy + eval: 0.5 == 0.5 at 2 decimals
    assert is_equal("\\sqrt{2}", "1.41")  # round(1.414.., 2) == 1.41
    assert not is_equal("\\sqrt{2}", "1.4")
    assert is_equal("(1,2)", "(1.0,2.0)")  # eval_tuple rounds each element: "(1.0,2.0)" both
    assert not is_equal("x+1", "1+x")  # eval raises NameError on a symbol -> False in the official code
    assert not is_equal("", "0")
    assert find_math_answer("The area is \\boxed{12 units}") == "12"  # "units" removed
    assert find_math_answer("\\boxed{x = 3}") == "3"  # the value after '='


def test_mathvision_jsonl_options_and_repair(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(png((9, 9, 9)))
    recs = [{"id": "1", "question": "Which?", "options": ["3", "\x0crac{1}{2}", "7"], "image": "images/1.jpg",
             "answer": "B", "solution": "", "level": 2, "subject": "algebra"},
            {"id": "2", "question": "Value?", "options": [], "image": "images/1.jpg", "answer": "\x0crac{3}{4}",
             "solution": "", "level": 5, "subject": "arithmetic"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bench, items = load(tmp_path / "test.jsonl")
    assert bench.name == "mathvision"
    assert items[0].meta["options"][1] == "\\frac{1}{2}" and items[1].answer == "\\frac{3}{4}"
    assert [(r["id"], r["field"]) for r in bench.repairs] == [("1", "options"), ("2", "answer")]
    v = verdicts(bench, items, {"1": "so \\boxed{0.5}", "2": "The answer is 0.75."})
    # "1": is_equal(gt option text "\frac{1}{2}", "0.5") numerically; "2": "0.75" after "is " is a number
    assert [(r["extracted"], r["correct"]) for r in v.values()] == [("\\frac{1}{2}", True), ("0.75", True)]
    assert items[0].groups == {"subject": ["algebra"], "level": ["2"]}
    # the HF parquet: decoded_image bytes win over the image path; the same rules
    rows = [r | {"decoded_image": {"bytes": png((7, 7, 7)), "path": None}, "image": "images/absent.jpg"} for r in recs]
    bench, items = load(write_parquet(tmp_path / "test.parquet", rows))
    assert bench.name == "mathvision" and items[0].images[0].open().getpixel((0, 0)) == (7, 7, 7)
    assert score_one(bench, items[0], "The answer is (B).")["correct"]  # " (B)." -> "b" == gt "B" lower-cased


def test_mathvision_official_prompt(tmp_path):
    # models/GPT4.py and models/Qwen-VL.py geninput: the instruction, f"{question}\n{options}", options as
    # "(A) x\n" lines, omitted when ''.join(options) == 'ABCDE' (the options are drawn in the image).
    head = ('Please solve the problem step by step and put your answer in one "\\boxed{}". If it is a multiple choice '
            'question, only one letter is allowed in the "\\boxed{}".\n')
    recs = [{"id": "1", "question": "Which number?\n<image1>", "options": [], "answer": "60", "level": 2, "subject": "arithmetic"},
            {"id": "2", "question": "Which one?", "options": ["1", "2", "3", "4", "5"], "answer": "B", "level": 1, "subject": "logic"},
            {"id": "3", "question": "Which box?", "options": ["A", "B", "C", "D", "E"], "answer": "C", "level": 1, "subject": "logic"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    _, items = load(tmp_path / "test.jsonl")
    assert [i.prompt for i in items] == [head + "Which number?\n<image1>\n",
                                         head + "Which one?\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5\n",
                                         head + "Which box?\n"]


def test_mathvision_vlmevalkit_tsv(tmp_path):
    # VLMEvalKit's MathVision.tsv: `choices` (eval'd as a list) and `category` (the subject), utils/mathv.py
    # post_check / MATH_V_acc; the question is sent as it is (image_base.py build_prompt).
    b64 = base64.b64encode(png((3, 3, 3))).decode()
    lines = ["index\timage\tquestion\tanswer\tchoices\tcategory",
             f"1\t{b64}\tHint: x\nQuestion: Which?\nChoices:\n(A) 3\n(B) 7\tB\t['3', '7']\talgebra".replace("\n", "\\n"),
             "2\t1\tValue?\t12\t[]\tarithmetic"]
    (tmp_path / "MathVision.tsv").write_text("\n".join(lines) + "\n")
    bench, items = load(tmp_path / "MathVision.tsv")
    assert bench.name == "mathvision" and items[0].prompt == "Hint: x\\nQuestion: Which?\\nChoices:\\n(A) 3\\n(B) 7"
    assert items[0].meta["options"] == ["3", "7"] and items[1].groups["subject"] == ["arithmetic"]
    # evaluate.py: " (B)." at the end -> "b", is_equal lower-cases the gold "B"
    assert score_one(bench, items[0], "so it is (B).")["correct"]


# --- We-Math ---------------------------------------------------------------------------------------------------

def test_wemath_step_rule():
    # load_and_process_data: split on "Answer", drop > < : . then the first character if in A-H
    assert processed_answer("<Thought process>: ... <Answer>: <<B>>") == "B"
    assert processed_answer("Answer: .C because") == "C"
    assert processed_answer("the answer is b") is None  # no capital "Answer": the whole text, 't' is not A-H
    assert processed_answer("Answer: E") == "E" and processed_answer("") is None
    assert processed_answer("Because the angle is 30") == "B"  # no "Answer": the whole text, and "B" is in A-H


def test_wemath_four_dimensions_by_hand():
    # Five two-step problems and one three-step problem, (steps..., multi):
    # p1 (T,T | T) CM strict+loose; p2 (F,T | T) RM strict, CM loose; p3 (F,F | T) RM strict+loose;
    # p4 (T,T | F) IG; p5 (F,T | F) IK; p6 (T,F,T | F) IK.
    J = {"p1": [True, True, True], "p2": [False, True, True], "p3": [False, False, True], "p4": [True, True, False],
         "p5": [False, True, False]}
    rows = [(p, f"2steps_{i + 1}" if i < 2 else "2steps_multi", j) for p, js in J.items() for i, j in enumerate(js)]
    rows += [("p6", "3steps_1", True), ("p6", "3steps_2", False), ("p6", "3steps_3", True), ("p6", "3steps_multi", False)]
    m = four_dimensional(rows)
    assert m["problems"] == 6
    assert m["counts"] == {"InadequateGeneralization": 1, "InsufficientKnowledge": 2, "CompleteMastery_loose": 2,
                           "CompleteMastery_strict": 1, "RoteMemorization_loose": 1, "RoteMemorization_strict": 2}
    assert m["score_strict"] == pytest.approx((6 - 0.5 * 1 - 2 - 2) / 6)
    assert m["score_loose"] == pytest.approx((6 - 0.5 * 1 - 1 - 2) / 6)
    assert m["rates"]["RoteMemorization_strict"] == pytest.approx(2 / 3)  # RM / (CM + RM)
    # accuracy.py: one-step = mean over all step answers, two-/three-step = mean of the multi-step answers
    assert m["step_accuracy"] == {"one_step": pytest.approx(8 / 13), "two_step": pytest.approx(3 / 5), "three_step": 0.0}


def test_wemath_parquet_end_to_end(tmp_path):
    rows = []
    for qn, (pid, key, ans) in enumerate([("1", "2steps_1", "A"), ("1", "2steps_2", "B"), ("1", "2steps_multi", "C")], 1):
        rows.append({"ID": pid, "split": "testmini", "knowledge concept": "Angles", "question": f"q{qn}", "option": "A. 1; B. 2; C. 3",
                     "answer": ans, "image_path": {"bytes": png((1, 2, 3)), "path": None}, "key": key, "question number": qn})
    bench, items = load(write_parquet(tmp_path / "testmini.parquet", rows))
    assert bench.name == "wemath" and items[0].prompt.startswith("Now, we require you") and "Option: A. 1" in items[0].prompt
    by_id = {it.id: it for it in items}
    scored = [score_one(bench, by_id[k], p) for k, p in {"1": "<Answer>: A", "2": "<Answer>: B", "3": "<Answer>: D"}.items()]
    m = bench.metrics(items, scored)["four_dimensional"]
    assert m["counts"]["InadequateGeneralization"] == 1 and m["score_strict"] == 0.5  # (1 - 0.5) / 1


def test_wemath_prompt_and_vlmevalkit_tsv(tmp_path):
    # The GitHub testmini.json record shape (We-Math/We-Math data/testmini.json), with We-Math's template
    rec = {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Length Units", "question": "OA = ( ) m",
           "option": "A. 300;B. 400; E. No correct answer", "answer": "A", "image_path": "2steps/image/1-1.png",
           "key": "2steps_1", "question number": 1, "knowledge concept description": "..."}
    (tmp_path / "2steps" / "image").mkdir(parents=True)
    (tmp_path / "2steps" / "image" / "1-1.png").write_bytes(png((4, 4, 4)))
    (tmp_path / "testmini.json").write_text(json.dumps([rec]))
    bench, [item] = load(tmp_path / "testmini.json")
    assert bench.name == "wemath" and item.id == "1"
    assert item.prompt == ("Now, we require you to solve a multiple-choice math question. Please briefly describe your thought "
                           "process and provide the final answer(option).\nQuestion: OA = ( ) m\nOption: A. 300;B. 400; E. No "
                           "correct answer\nRegarding the format, please answer following the template below, and be sure to "
                           "include two <> symbols:\n<Thought process>: <<your thought process>> <Answer>: <<your option>>")
    # VLMEvalKit's WeMath.tsv: options in columns A-H; image_mcq.py WeMath.build_prompt
    b64 = base64.b64encode(png((4, 4, 4))).decode()
    (tmp_path / "WeMath.tsv").write_text("index\timage\tquestion\tA\tB\tC\tanswer\tID\tkey\tknowledge concept\n"
                                         f"7\t{b64}\tOA = ( ) m\t300\t400\t\tB\t2steps_1\t2steps_1\tLength Units\n")
    bench, [item] = load(tmp_path / "WeMath.tsv")
    assert bench.name == "wemath" and item.id == "7"
    assert item.prompt == "Question: OA = ( ) m\nOptions:\nA. 300\nB. 400\n"
    # utils/wemath.py load_and_process_data: the same rule as four_dimensional_metrics.py
    assert score_one(bench, item, "<Thought process>: ... <Answer>: <<B>>")["correct"]


# --- LogicVista ------------------------------------------------------------------------------------------------

def test_logicvista_dataset_json(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(4):
        (tmp_path / "images" / f"v1_{i}.png").write_bytes(png((i, i, i)))
    data = {f"v1_{i}": {"imagename": f"v1_{i}.png", "question": "Which?", "answer": a, "reasoning": "", "skill": [s],
                        "capability": ["diagram"], "imagesource": "x", "sourcelink": "y"}
            for i, (a, s) in enumerate([("A, C", "inductive"), ("B", "deductive"), ("B", "deductive"), ("3", "numerical")])}
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    bench, items = load(tmp_path / "dataset.json")
    assert bench.name == "logicvista" and [i.id for i in items] == ["v1_0", "v1_1", "v1_2", "v1_3"]
    v = verdicts(bench, items, {"v1_0": "The answer is \\boxed{C, A}",  # sorted set match: ["a","c"] == ["a","c"]
                                "v1_1": "F",  # one letter outside a-e: ZZZZZ (extract_accuracy.py)
                                "v1_2": "ASSISTANT: B",  # the text after ASSISTANT:
                                "v1_3": "\\boxed{3}"})
    assert [r["correct"] for r in v.values()] == [True, False, True, True]
    assert v["v1_1"]["extracted"] is None


def test_logicvista_published_schema_prompt_and_capabilities(tmp_path):
    # data/dataset.json has broad_capability/specific_capability (no `capability`, which the eval code reads);
    # analyze_accuracy.py counts a record for each of its nine names that str.contains finds.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "v1_0.png").write_bytes(png((0, 0, 0)))
    rec = {"imagename": "v1_0.png", "question": "What choice (A, B, C, or D) fits?", "answer": "C", "reasoning": "",
           "skill": ["inductive"], "broad_capability": ["diagram and ocr"], "specific_capability": ["sequence pattern"],
           "imagesource": "x", "sourcelink": "y", "liscenced": "false"}
    (tmp_path / "dataset.json").write_text(json.dumps({"v1_0": rec}))
    bench, [item] = load(tmp_path / "dataset.json")
    assert item.prompt == "What choice (A, B, C, or D) fits?"  # VLMEvalKit/lmms-eval send the question as it is
    assert item.groups == {"skill": ["inductive"], "capability": ["diagram", "ocr"]}
    # free text: VLMEvalKit's can_infer_option (the one option letter among the last four words) stands in for GPT
    assert score_one(bench, item, "Based on the pattern, the correct choice would be C.")["correct"]
    assert score_one(bench, item, "It could be A or C, not sure")["extracted"] is None  # two letters: no one choice
    # VLMEvalKit's LogicVista.tsv: `skill`, no capability (utils/logicvista.py)
    b64 = base64.b64encode(png((0, 0, 0))).decode()
    (tmp_path / "LogicVista.tsv").write_text(f"index\timage\tquestion\tanswer\tskill\n3\t{b64}\tWhich?\tB, D\t['deductive']\n")
    bench, [item] = load(tmp_path / "LogicVista.tsv")
    assert bench.name == "logicvista" and item.groups["skill"] == ["deductive"] and item.prompt == "Which?"
    assert score_one(bench, item, "\\boxed{D, B}")["correct"]


# --- MathVerse -------------------------------------------------------------------------------------------------

def test_mathverse_parquet(tmp_path):
    meta = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}
    rows = [{"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant", "question": "Q1\nChoices:\nA:30\nB:60",
             "image": {"bytes": png((5, 5, 5)), "path": None}, "answer": "B", "question_type": "multi-choice", "metadata": meta,
             "query_wo": "Q1 plain", "query_cot": "Q1 think step by step", "question_for_eval": "Q1"},
            {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only", "question": "",
             "image": {"bytes": png((5, 5, 5)), "path": None}, "answer": "0.5", "question_type": "free-form", "metadata": meta,
             "query_wo": "", "query_cot": "Q2 cot", "question_for_eval": ""}]
    bench, items = load(write_parquet(tmp_path / "testmini.parquet", rows))
    assert bench.name == "mathverse" and items[0].prompt == "Q1 think step by step"  # query_cot
    assert "GPT-free approximation" in bench.approximation
    v = verdicts(bench, items, {"1": "so \\boxed{B: 60}", "2": "\\boxed{\\frac{1}{2}}"})
    assert [r["correct"] for r in v.values()] == [True, True]
    assert verdicts(bench, items, {"1": "\\boxed{A}"})["1"]["correct"] is False
    text_only = [{k: v for k, v in r.items() if k != "image"} for r in rows]  # the text-only config has no image
    bench, items = load(write_parquet(tmp_path / "text_only.parquet", text_only))
    assert bench.name == "mathverse" and items[0].images == []


# --- VLMEvalKit TSV --------------------------------------------------------------------------------------------

def test_vlmevalkit_tsv_base64_and_index_reference(tmp_path):
    b64 = base64.b64encode(png((0, 128, 0), (20, 10))).decode()
    lines = ["index\timage\tquestion\tanswer\tquestion_type\tanswer_type\tchoices\tprecision\tunit\tskills",
             f"10\t{b64}\tWhich?\tB\tmulti_choice\ttext\t['A', 'B']\t\t\t['logic']",
             "11\t10\tHow many?\t4\tfree_form\tinteger\t\t\t\t['counting']",
             "12\t10\tLength?\t2.5\tfree_form\tfloat\t\t1.0\t\t['measure']"]  # precision as TSV text
    (tmp_path / "MathVista_MINI.tsv").write_text("\n".join(lines) + "\n")
    bench, items = load(tmp_path / "MathVista_MINI.tsv")
    assert bench.name == "mathvista" and [i.id for i in items] == ["10", "11", "12"]
    assert items[1].images[0].open().size == (20, 10)  # "10" is index 10's image
    assert items[0].meta["choices"] == ["A", "B"] and items[0].groups["skills"] == ["logic"]
    v = verdicts(bench, items, {"10": "B", "11": "4", "12": "2.50"})  # str(round(2.5, int(1.0))) == "2.5"
    assert all(r["correct"] for r in v.values())
    (tmp_path / "bad.tsv").write_text("index\timage\tquestion\tanswer\tskill\tcapability\n1\t7\tq\tA\ts\tc\n")
    with pytest.raises(DataError, match=r"image refers to index '7', which has no image"):
        load(tmp_path / "bad.tsv")


def test_vlmevalkit_mathvista_columns(tmp_path):
    # VLMEvalKit's MathVista_MINI.tsv as its utils/mathvista.py reads it: `question` (the query, sent as it is),
    # `answer` (choice text), `answer_option`, `choices`, `task`, `skills`; no precision column.
    b64 = base64.b64encode(png((0, 0, 9))).decode()
    lines = ["index\timage\tquestion\tanswer\tanswer_option\tchoices\tquestion_type\tanswer_type\ttask\tskills",
             f"1\t{b64}\tHint: Please answer.\\nQuestion: Length?\t1.3\t\t\tfree_form\tfloat\tFQA\t['arithmetic reasoning']",
             ("2\t1\tHint: pick.\\nQuestion: Which?\\nChoices:\\n(A) 120\\n(B) 145\t145\tB\t['120', '145']\tmulti_choice\ttext\tGPS\t"
              "['geometry reasoning']")]
    (tmp_path / "MathVista_MINI.tsv").write_text("\n".join(lines) + "\n")
    bench, items = load(tmp_path / "MathVista_MINI.tsv")
    assert bench.name == "mathvista" and items[0].prompt == "Hint: Please answer.\\nQuestion: Length?"
    assert items[0].meta["precision"] == 1.0  # the gold's decimals, as every float answer of testmini
    # calculate_score.py: str(round(1.34, 1)) = "1.3" == "1.3"; round(1.36, 1) = "1.4" != "1.3"
    assert [score_one(bench, items[0], p)["correct"] for p in ("1.34", "1.36")] == [True, False]
    assert (items[1].groups["task"], items[1].groups["skills"]) == (["GPS"], ["geometry reasoning"])
    assert score_one(bench, items[1], "\\boxed{(B)}")["correct"]  # normalize_extracted_answer: (B) -> "145" == answer


def test_vlmevalkit_mathverse_metadata_text(tmp_path):
    # VLMEvalKit's MathVerse TSV keeps `metadata` as Python text (utils/mathverse.py parses it for subject/subfield)
    b64 = base64.b64encode(png((0, 9, 0))).decode()
    meta = str({"split": "testmini", "subject": "Plane Geometry", "subfield": "Angle"})
    (tmp_path / "MathVerse_MINI.tsv").write_text(
        "index\timage\tquestion\tquery_cot\tanswer\tquestion_type\tproblem_version\tmetadata\n"
        f"1\t{b64}\tQ plain\tQ think\tB\tmulti-choice\tVision Only\t{meta}\n")
    bench, [item] = load(tmp_path / "MathVerse_MINI.tsv")
    assert bench.name == "mathverse" and item.prompt == "Q think"
    assert item.groups == {"problem_version": ["Vision Only"], "subject": ["Plane Geometry"], "subfield": ["Angle"]}


def test_detection_and_format_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataError, match=r"cannot tell which benchmark .* --format"):
        load(tmp_path / "x.jsonl")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"unknown benchmark file type '.csv'"):
        load(tmp_path / "x.csv")
    with pytest.raises(DataError, match="unknown benchmark format 'nope'"):
        get("nope")


JUNK = [None, float("nan"), 12, "", "\\boxed{" * 50, "\\boxed{" + "9" * 3000 + "}", "\x00\x0c", "}" * 10,
        "Answer" * 3, "ASSISTANT:", "\\frac{1}{0}", "(((", "\\boxed{\\sqrt{-1}}"]


def test_unparseable_predictions_are_wrong_never_a_crash(tmp_path):
    rows = {
        "mv.parquet": mathvista_rows(),
        "mathv.jsonl": [{"id": "1", "question": "q", "options": [], "answer": "\\frac{1}{2}", "level": 1, "subject": "s"},
                        {"id": "2", "question": "q", "options": ["1", "2"], "answer": "A", "level": 1, "subject": "s"}],
        "verse.jsonl": [{"sample_index": "1", "problem_version": "Vision Only", "question": "q", "answer": "2\\sqrt{3}",
                         "question_type": "free-form", "query_cot": "q"}],
        "wemath.jsonl": [{"ID": "1", "key": "2steps_1", "knowledge concept": "k", "question": "q", "option": "A. 1",
                          "answer": "D"}],
        "logic.jsonl": [{"id": "v1_0", "question": "q", "answer": "A, C", "skill": ["inductive"], "capability": ["ocr"]}],
    }
    for name, recs in rows.items():
        path = tmp_path / name
        if name.endswith(".parquet"):
            write_parquet(path, recs)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        bench, items = load(path)
        for junk in JUNK:
            for it in items:
                row = score_one(bench, it, junk, lenient=True)
                assert isinstance(row["correct"], bool) and isinstance(row["lenient_correct"], bool), (name, junk)
                # wrong, except where MathVista's official rule maps any text to the nearest choice
                assert not row["correct"] or it.meta.get("question_type") == "multi_choice", (name, junk)


# --- the time-bounded math helper ------------------------------------------------------------------------------

def test_a_slow_parse_can_neither_hang_nor_crash():
    # sympy evaluates 9^(9^(9^9)) inside one C call, which signal.alarm cannot interrupt: the helper is killed at
    # its deadline, answers "no value", and the next call gets a fresh helper. From a thread (no signal.alarm there)
    # the same holds.
    assert mathcheck.numeric_value("\\frac{1}{4}") == 0.25  # warm: the helper has started
    before = mathcheck.timeouts()
    t0 = time.monotonic()
    assert mathcheck.numeric_value("9^{9^{9^{9}}}", timeout=0.5) is None
    assert time.monotonic() - t0 < 10 and mathcheck.timeouts() == before + 1
    out = []
    th = threading.Thread(target=lambda: out.append((mathcheck.equivalent("9^{9^{9^{9}}}", "2", timeout=0.5),
                                                    mathcheck.equivalent("\\frac{2}{4}", "0.5"))))
    th.start()
    th.join(60)
    assert out == [(False, True)] and mathcheck.timeouts() == before + 2
