"""The README shows the C++ example that ctest compiles and runs (examples/readme_example.cpp),
so the two must not drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_shows_the_compiled_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "readme_example.cpp").read_text()
    assert "```cpp\n" + example + "```" in readme


def test_readme_quick_start_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/run-experiment.sh" in readme


def test_python_reference_example_runs():
    """docs/python.md's torch example, run as written."""
    text = (ROOT / "docs" / "python.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    import torch
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the example's tensors are torch's default float32
    try:
        exec(compile(example, "docs/python.md", "exec"), {})
    finally:
        torch.set_default_dtype(default)
