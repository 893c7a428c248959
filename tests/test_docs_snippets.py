"""The README and docs/*.md work as written: every fenced block is checked, one test per (file, block).

- ```python blocks run, each in a fresh namespace, in ONE subprocess for all of them (isolation from the
  pytest process; XLA's backend optimisation level 0 compiles about twice as fast on a 2-core runner),
  in a working folder laid out as the docs assume: `checkpoints/llava-1.5-7b` is the shipped toy LLaVA
  (jaxflow/assets/toy_llava), `checkpoints/internvl3-1b` and `checkpoints/qwen2-vl-7b` are the tiny
  random checkpoints of conftest's session fixtures, `data/` holds `jaxflow.data.fixtures` (so
  `data/pope`, `data/textvqa/train_images`, `data/coco/val2014` exist), and `photo.jpg`, `cat.jpg`,
  `dog.jpg` are the bundled demo image. So the blocks run verbatim, except where PREAMBLES (a fragment
  that uses names defined in the prose around it) or SUBSTITUTIONS (a CUDA device) say otherwise;
  POSTCHECKS then assert what the block's comments claim (shapes, values).
- ```bash blocks: every command (continuations joined, comments stripped, `&&` split). `python scripts/X.py
  ...` must name an existing script and its arguments must parse with that script's own absl flags,
  through `jaxflow.cli.parse_flags` exactly as the script parses them (an unknown flag, a bad enum or
  integer value, a missing required flag, a stray positional argument fail); running each command
  end to end is far too slow here (the scripts' own tests run them: test_demo, test_analyze_script,
  test_truncation_script, test_evaluate, test_faithfulness, test_toy_train, test_scripts_internvl).
  `pip install -e ".[extra]"` must name extras that pyproject.toml defines.
- ```json blocks parse as JSON (a document, or JSON lines); blocks with "..." placeholders are ```text.
- ```text blocks are prose (prompts, signatures); SIGNATURES compares a signature block with the code.
- No doc (README.md, docs/*.md, BUILD.md) refers to a file outside the repository.

`scripts/*.py --help` exiting 0 is tested in test_bad_inputs.py (test_help_exits_zero).
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import traceback

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
ALL_DOCS = DOCS + ["BUILD.md"]  # BUILD.md's blocks are build/benchmark notes (GPU machines): references only
LANGS = ("python", "bash", "json", "text")

FENCE_OPEN = re.compile(r"^```(\S*)\s*$")


def doc_blocks(doc: str) -> list[tuple[int, str, int, str]]:
    """[(index, language, line of the opening fence (1-based), body)] of a markdown file."""
    out, open_at, lang, body = [], None, "", []
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines, 1):
        if open_at is None:
            m = FENCE_OPEN.match(line)
            if m:
                open_at, lang, body = n, m.group(1), []
        elif line.strip() == "```":
            out.append((len(out), lang, open_at, "\n".join(body) + "\n"))
            open_at = None
        else:
            body.append(line)
    assert open_at is None, f"{doc}:{open_at}: unclosed code fence"
    return out


BLOCKS = [(doc, i, lang, line, body) for doc in DOCS for i, lang, line, body in doc_blocks(doc)]


def _params(lang):
    return [pytest.param(doc, i, line, body, id=f"{doc}::block{i}") for doc, i, la, line, body in BLOCKS if la == lang]


# --- python blocks ----------------------------------------------------------------------------------

# A fragment that uses names the surrounding prose defines gets them here, keyed by a substring that
# occurs in exactly one block (test_keys_name_one_block).
PREAMBLES = {
    # README "A model already in memory converts without files": `path` is a transformers LLaVA folder,
    # here a tiny random one built offline (tests/hf_reference.py).
    "LlavaForConditionalGeneration.from_pretrained(path": (
        "import torch\n"
        "from transformers import LlavaForConditionalGeneration\n"
        "import jaxflow\n"
        "import hf_reference\n"
        "path = 'hf/tiny-llava'\n"
        "hf_reference.save_hf(hf_reference.build_hf_model('mha'), path)\n"),
    # docs/families.md, Qwen2-VL: `images`, `model`, `input_ids`, `attention_mask` are an image list, the
    # loaded model and an encoded prompt for that image.
    "px = preprocess_qwen2_vl(images": (
        "import jaxflow\n"
        "from PIL import Image\n"
        "from jaxflow.pipeline import encode, load_bundle\n"
        "bundle = load_bundle('checkpoints/qwen2-vl-7b')\n"
        "model = bundle.model\n"
        "images = [Image.open('photo.jpg')]\n"
        "batch, _ = encode(bundle, ['photo.jpg'], ['What is on the table?'])\n"
        "input_ids, attention_mask = batch.input_ids, batch.attention_mask\n"),
}

# Text replaced in a block before it runs (key: a substring of exactly one block).
SUBSTITUTIONS = {
    # the test machine has no CUDA device (and accelerate is not a dependency): load on the CPU
    "LlavaForConditionalGeneration.from_pretrained(path": [(', device_map="cuda"', "")],
}

# What the block's comments claim, checked after it ran (key: a substring of exactly one block).
POSTCHECKS = {
    "LlavaForConditionalGeneration.from_pretrained(path": (
        "import jax, jax.numpy as jnp\n"
        "from jaxflow.convert.checkpoint import model_params\n"
        "assert model.family == 'llava'\n"
        "assert {l.dtype for l in jax.tree.leaves(model_params(model))} == {jnp.dtype(jnp.bfloat16)}\n"),
    'model = jaxflow.load("checkpoints/llava-1.5-7b")': (
        "B, T = batch.input_ids.shape\n"
        "assert out.logits.shape[:2] == (B, T) and out.logits.ndim == 3\n"),
    "ans = answer(bundle, [\"photo.jpg\"]": (
        "L = cams.shape[1]\n"
        "assert cams.ndim == 4 and cams.shape[0] == 1\n"
        "assert shares.shape == (1, L, 3)\n"
        "assert flow.flows['T->A'].shape == (1, L)\n"),
    "paths = write_fixtures(tempfile.mkdtemp())": (
        "assert len(ds) == 12\n"
        "assert item.id == 'random/1' and item.answers == ('yes',)\n"
        "assert item.image.endswith('COCO_val2014_000000000042.jpg')\n"),
    "res = run_evaluation(EvalConfig(": (
        "s = res.summary\n"
        "assert s['dataset'] == 'textvqa' and 'cliff_layer' in s\n"
        "assert [p['K'] for p in s['per_layer']] == list(range(s['num_layers'] + 1))\n"),
    "px = preprocess_qwen2_vl(images": "assert out.logits.shape[:2] == input_ids.shape\n",
    'bundle = load_bundle("checkpoints/internvl3-1b")': (
        "assert paper.shape == (cams.maps['paper'].shape[1], gh, gw)\n"),
    "sweep = jaxflow.truncation_sweep(": (
        "L1, B = sweep.next_token.shape\n"
        "assert B == 2 and sweep.logits.shape[:2] == (L1, B) and sweep.last_logits.shape[:2] == (L1, B)\n"
        "assert lean.logits is None and lean.last_logits.shape == sweep.last_logits.shape\n"
        "assert gen.tokens.shape == (L1, B, 8) and gen.lengths.shape == (L1, B)\n"),
}


def _keyed(table: dict, body: str):
    hits = [v for k, v in table.items() if k in body]
    assert len(hits) <= 1
    return hits[0] if hits else None


def _xla_env() -> dict:
    # XLA's backend optimisation level 0 compiles ~2x faster on a 2-core runner (as in test_analyze_script)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


def _run_plan(plan: dict, tmp, **env) -> dict:
    plan_file, results_file = tmp / "plan.json", tmp / "results.json"
    plan_file.write_text(json.dumps(plan))
    res = subprocess.run([sys.executable, os.path.abspath(__file__), str(plan_file), str(results_file)],
                         capture_output=True, text=True, cwd=plan.get("cwd", REPO), timeout=900,
                         env={**_xla_env(), **env})
    assert res.returncode == 0 and results_file.exists(), (res.stdout[-3000:], res.stderr[-5000:])
    return json.loads(results_file.read_text())


@pytest.fixture(scope="module")
def python_results(tmp_path_factory, tiny_internvl_checkpoint, tiny_qwen2_vl_checkpoints):
    """Runs every python block once (one subprocess); {block id: {"ok", "error", "seconds"}}."""
    from jaxflow.data.fixtures import write_fixtures
    from jaxflow.tiny import make_demo_image

    work = tmp_path_factory.mktemp("docs-work")
    os.makedirs(work / "checkpoints")
    os.symlink(os.path.join(REPO, "jaxflow", "assets", "toy_llava"), work / "checkpoints" / "llava-1.5-7b")
    os.symlink(tiny_internvl_checkpoint, work / "checkpoints" / "internvl3-1b")
    os.symlink(tiny_qwen2_vl_checkpoints["qwen2_vl"], work / "checkpoints" / "qwen2-vl-7b")
    write_fixtures(str(work / "data"))
    image = make_demo_image().convert("RGB")
    for name in ("photo.jpg", "cat.jpg", "dog.jpg"):
        image.save(work / name)
    tasks = []
    for doc, i, lang, line, body in BLOCKS:
        if lang != "python":
            continue
        code = body
        for old, new in _keyed(SUBSTITUTIONS, body) or ():
            assert old in code, (doc, i, old)
            code = code.replace(old, new)
        tasks.append({"id": f"{doc}::block{i}", "file": doc, "line": line, "code": code,
                      "preamble": _keyed(PREAMBLES, body) or "", "check": _keyed(POSTCHECKS, body) or ""})
    os.makedirs(work / "tmp")  # tempfile.mkdtemp() in a block
    return _run_plan({"kind": "python", "cwd": str(work), "tasks": tasks}, tmp_path_factory.mktemp("docs-plan"),
                     TMPDIR=str(work / "tmp"))


@pytest.mark.parametrize("doc,index,line,body", _params("python"))
def test_python_block(doc, index, line, body, python_results):
    r = python_results[f"{doc}::block{index}"]
    if not r["ok"] and "No module named 'torch'" in r["error"]:
        pytest.skip("torch (the test extra) is not installed")
    assert r["ok"], f"{doc}:{line} (block {index}) fails:\n{r['error']}"


def test_keys_name_one_block():
    for table in (PREAMBLES, SUBSTITUTIONS, POSTCHECKS, SIGNATURES):
        for key in table:
            hits = [(doc, i) for doc, i, lang, line, body in BLOCKS if key in body]
            assert len(hits) == 1, f"key {key!r} should name exactly one block, names {hits}"


# --- bash blocks ------------------------------------------------------------------------------------

def bash_commands(body: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments stripped, split at && ; ||."""
    out = []
    for line in body.replace("\\\n", " ").split("\n"):
        cmd = []
        for tok in shlex.split(line, comments=True):
            if tok in ("&&", ";", "||"):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        out.append(cmd)
    return [c for c in out if c]


def _pyproject_extras() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"].get("optional-dependencies", {})


def _classify(cmd: list[str]):
    """("script", path, argv) | ("pip", targets) | ("pytest",) | ("bash", path); anything else fails."""
    if cmd[0] in ("python", "python3"):
        if cmd[1:3] == ["-m", "pip"]:
            assert cmd[3] == "install", cmd
            return ("pip", [t for t in cmd[4:] if not t.startswith("-")])
        if cmd[1:3] == ["-m", "pytest"]:
            return ("pytest",)
        assert cmd[1].startswith("scripts/") and cmd[1].endswith(".py"), f"unknown command {cmd}"
        return ("script", cmd[1], cmd[2:])
    if cmd[0] == "bash":
        return ("bash", cmd[1])
    raise AssertionError(f"unknown command {' '.join(cmd)!r}: teach tests/test_docs_snippets.py to check it")


@pytest.fixture(scope="module")
def flag_results(tmp_path_factory):
    """Parses every doc command's flags with its script's own flag definitions (one subprocess)."""
    tasks = []
    for doc, i, lang, line, body in BLOCKS:
        if lang != "bash":
            continue
        for k, cmd in enumerate(bash_commands(body)):
            try:
                kind = _classify(cmd)
            except AssertionError:
                continue  # test_bash_block reports it
            if kind[0] == "script" and os.path.exists(os.path.join(REPO, kind[1])):
                tasks.append({"id": f"{doc}::block{i}::{k}", "script": kind[1], "argv": kind[2]})
    return _run_plan({"kind": "flags", "tasks": tasks}, tmp_path_factory.mktemp("docs-flags"))


@pytest.mark.parametrize("doc,index,line,body", _params("bash"))
def test_bash_block(doc, index, line, body, flag_results):
    cmds = bash_commands(body)
    assert cmds, f"{doc}:{line}: empty bash block"
    extras = _pyproject_extras()
    for k, cmd in enumerate(cmds):
        kind = _classify(cmd)
        where = f"{doc}:{line} (block {index}) `{shlex.join(cmd)}`"
        if kind[0] == "script":
            assert os.path.isfile(os.path.join(REPO, kind[1])), f"{where}: no such script"
            r = flag_results[f"{doc}::block{index}::{k}"]
            assert r["ok"], f"{where}: {r['error']}"
        elif kind[0] == "pip":
            assert kind[1], where
            for target in kind[1]:
                m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
                assert m, f"{where}: installs {target!r}, not this repository"
                for extra in (m.group(1) or "").split(","):
                    assert not extra or extra in extras, f"{where}: pyproject.toml has no extra {extra!r}"
        elif kind[0] == "pytest":
            assert "pytest" in extras.get("test", []), where
        elif kind[0] == "bash":
            assert os.path.isfile(os.path.join(REPO, kind[1])), f"{where}: no such file"


def test_readme_first_command_is_the_demo_without_flags():
    doc, i, lang, line, body = next(b for b in BLOCKS if b[0] == "README.md")
    assert lang == "bash"
    assert ["python3", "scripts/demo.py"] in bash_commands(body)


def test_flag_parsing_catches_bad_commands(tmp_path):
    """The flag check is not vacuous: an unknown flag, a bad enum value, a missing required flag and a
    stray argument fail; a good command passes."""
    tasks = [{"id": "good", "script": "scripts/evaluate.py", "argv": ["--dataset", "pope", "--batch_size", "4"]},
             {"id": "unknown", "script": "scripts/evaluate.py", "argv": ["--dataset=pope", "--no_such_flag=1"]},
             {"id": "enum", "script": "scripts/evaluate.py", "argv": ["--dataset=popes"]},
             {"id": "int", "script": "scripts/analyze.py", "argv": ["--smooth_n=many"]},
             {"id": "required", "script": "scripts/convert_checkpoint.py", "argv": ["--hf_dir=x"]},
             {"id": "positional", "script": "scripts/demo.py", "argv": ["photo.jpg"]}]
    r = _run_plan({"kind": "flags", "tasks": tasks}, tmp_path)
    assert r["good"]["ok"], r["good"]
    for bad in ("unknown", "enum", "int", "required", "positional"):
        assert not r[bad]["ok"], bad


# --- json and text blocks ---------------------------------------------------------------------------

@pytest.mark.parametrize("doc,index,line,body", _params("json"))
def test_json_block(doc, index, line, body):
    try:
        json.loads(body)
        return
    except json.JSONDecodeError as e:
        whole = e
    lines = [ln for ln in body.split("\n") if ln.strip()]
    try:
        for ln in lines:  # JSON lines
            json.loads(ln)
    except json.JSONDecodeError as e:
        pytest.fail(f"{doc}:{line} (block {index}) is neither JSON ({whole}) nor JSON lines ({e}); "
                    "mark a block with placeholders ```text")


# A signature written as text, compared with the code: key -> the function.
SIGNATURES = {
    "ds = load_dataset(name, data_dir, image_dir, *,": "jaxflow.data.datasets:load_dataset",
}


@pytest.mark.parametrize("doc,index,line,body", _params("text"))
def test_text_block(doc, index, line, body):
    assert body.strip(), f"{doc}:{line}: empty block"
    target = _keyed(SIGNATURES, body)
    if target is None:
        return  # prose: a prompt, an output
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    call = body.strip().split("=", 1)[1].strip() if re.match(r"\w+\s*=\s*\w", body.strip()) else body.strip()
    assert call.startswith(name + "("), call
    tree = ast.parse(f"def {call}: pass")
    args = tree.body[0].args
    got = ([a.arg for a in args.args], [a.arg for a in args.kwonlyargs], args.kwarg and args.kwarg.arg,
           [ast.literal_eval(d) for d in args.defaults + [d for d in args.kw_defaults if d is not None]])
    sig = inspect.signature(fn).parameters.values()
    kinds = inspect.Parameter
    want = ([p.name for p in sig if p.kind == kinds.POSITIONAL_OR_KEYWORD],
            [p.name for p in sig if p.kind == kinds.KEYWORD_ONLY],
            next((p.name for p in sig if p.kind == kinds.VAR_KEYWORD), None),
            [p.default for p in sig if p.default is not kinds.empty])
    assert got == want, f"{doc}:{line}: the documented signature {got} is not the code's {want}"


def test_every_block_has_a_known_language():
    bad = [(doc, line, lang) for doc, i, lang, line, body in BLOCKS if lang not in LANGS]
    assert not bad, f"blocks without a language this test checks ({', '.join(LANGS)}): {bad}"


# --- references -------------------------------------------------------------------------------------

# Absolute paths a doc may show: placeholders, and one example of the reader's own folders.
ALLOWED_ABSOLUTE = ("/path/to/",
                    "/data/coco/val2014/")  # docs/datasets.md: an example error message about the reader's data
ABSOLUTE = re.compile(r"(?<![\w.:/~$}\-])/(?:[A-Za-z][\w.\-]*)(?:/[\w.\-{}*]*)*")
IGNORED_OUTPUTS = ("outputs/", "checkpoints/", "benchmarks/results/")  # git-ignored: written by runs
REPO_PATH = re.compile(r"(?<![\w./\-])((?:jaxflow|scripts|tests|benchmarks|docs)/[\w./\-]*)")


def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", f.read(), re.M)}


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_no_reference_outside_the_repository(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        text = f.read()
    here = os.path.dirname(os.path.join(REPO, doc))
    problems = []
    for n, line in enumerate(text.split("\n"), 1):
        for m in ABSOLUTE.finditer(line):
            p = m.group(0)
            if p.count("/") >= 2 and not p.startswith(ALLOWED_ABSOLUTE):  # (a URL's path follows "/" or ":")
                problems.append(f"{doc}:{n}: absolute path {p}")
        if "../" in line:
            for m in re.finditer(r"(?:\.\./)+[\w.\-/]*", line):
                target = os.path.realpath(os.path.join(here, m.group(0)))
                if not (target + "/").startswith(REPO + "/"):
                    problems.append(f"{doc}:{n}: {m.group(0)} leaves the repository")
        for m in re.finditer(r"[\w./\-]+\.md\b", line):  # DESIGN.md and friends
            name = m.group(0)
            if name.startswith(("http", "www.")) or "://" in line[max(0, m.start() - 8):m.start()]:
                continue
            if not any(os.path.exists(os.path.join(base, name)) for base in (here, REPO)):
                problems.append(f"{doc}:{n}: {name} is not in the repository")
        for m in re.finditer(r"\]\(([^)\s]+)\)", line):  # markdown links
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.realpath(os.path.join(here, path)) if path else os.path.join(REPO, doc)
            if not (full + "/").startswith(REPO + "/") or not os.path.exists(full):
                problems.append(f"{doc}:{n}: link {target} does not resolve inside the repository")
            elif anchor and anchor not in _anchors(full):
                problems.append(f"{doc}:{n}: link {target}: no heading #{anchor}")
        for m in REPO_PATH.finditer(line):  # jaxflow/..., scripts/..., ... name files of this repository
            p = m.group(1).rstrip(".")  # a sentence's full stop
            if any(c in line[m.end():m.end() + 1] for c in "*{") or p.startswith(IGNORED_OUTPUTS):
                continue
            if not os.path.exists(os.path.join(REPO, p)):
                problems.append(f"{doc}:{n}: {p} does not exist")
    assert not problems, "\n".join(problems)


# --- the subprocess that runs a plan ----------------------------------------------------------------

def _run_python_tasks(tasks: list[dict]) -> dict:
    sys.path.insert(0, os.path.join(REPO, "tests"))  # hf_reference for the README's in-memory conversion
    results = {}
    for t in tasks:
        ns = {"__name__": "__docs__"}
        start = time.perf_counter()
        try:
            if t["preamble"]:
                exec(compile(t["preamble"], f"<preamble of {t['id']}>", "exec"), ns)
            # leading new lines: the traceback's line numbers are the doc's
            exec(compile("\n" * t["line"] + t["code"], os.path.join(REPO, t["file"]), "exec"), ns)
            if t["check"]:
                exec(compile(t["check"], f"<check of {t['id']}>", "exec"), ns)
            results[t["id"]] = {"ok": True}
        except BaseException:  # noqa: BLE001 - reported per block
            results[t["id"]] = {"ok": False, "error": traceback.format_exc(limit=-8)}
        results[t["id"]]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{t['id']}: {results[t['id']]}", flush=True)
    return results


def _run_flag_tasks(tasks: list[dict]) -> dict:
    import contextlib
    import io

    from absl import flags

    from jaxflow.cli import parse_flags

    FLAGS = flags.FLAGS
    results = {}
    for script in dict.fromkeys(t["script"] for t in tasks):
        path = os.path.join(REPO, script)
        before = set(FLAGS)
        spec = importlib.util.spec_from_file_location("_docs_" + os.path.basename(script)[:-3], path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # defines the script's flags
        for t in (t for t in tasks if t["script"] == script):
            err, rest = io.StringIO(), None
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rest = parse_flags([path, *t["argv"]])
            except SystemExit as e:
                rest = [path] if e.code == 0 else None
            if rest is None:
                results[t["id"]] = {"ok": False, "error": err.getvalue().strip() or "flag error"}
            elif len(rest) > 1:  # jaxflow.cli.run refuses these
                results[t["id"]] = {"ok": False, "error": f"unexpected arguments: {rest[1:]}"}
            else:
                results[t["id"]] = {"ok": True}
            FLAGS.unparse_flags()
        for name in set(FLAGS) - before:  # the next script defines its own flags of the same names
            delattr(FLAGS, name)
    return results


if __name__ == "__main__":
    plan_path, results_path = sys.argv[1:3]
    with open(plan_path) as f:
        plan = json.load(f)
    run = _run_python_tasks if plan["kind"] == "python" else _run_flag_tasks
    out = run(plan["tasks"])
    with open(results_path, "w") as f:
        json.dump(out, f)
