"""predict.py as `cog build` (Cog 0.23.1) reads it: statically, with tree-sitter, never importing it.

The schema that static reading gives (tests/cog_static_schema.py, cog's rules) must equal the one
the runtime serves (.cog/openapi_schema.json, written by importing predict.py; its freshness is
tests/test_cog_http.py's test_openapi_schema_file_matches_predict_py), and every literal in
predict.py must equal engine.inputs, the owner of the values. The emulation itself is checked
on cases taken from cog's own Go tests (their sources and expected results, cited by name) and
on the forms predict.py used before, which cog drops or refuses.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from engine import inputs
from tests.cog_static_schema import CogSchemaError, static_schema

ROOT = Path(__file__).resolve().parent.parent


def _schema_of(tmp_path: Path, body: str, header: str = "") -> dict:
    source = (
        "from cog import BasePredictor, Input, Path\n"
        + textwrap.dedent(header)
        + textwrap.dedent(
            """
        class Predictor(BasePredictor):
            def predict(self, {body}) -> str:
                pass
        """
        ).format(body=body)
    )
    path = tmp_path / "predict.py"
    path.write_text(source)
    return static_schema(path)


def _input(schema: dict, name: str) -> dict:
    return schema["Input"]["properties"][name]


def _normalized(props: dict) -> dict:
    """One representational difference, no semantic one: for a nullable input without a default
    the static generator writes ``"default": null`` where the import-based one leaves it out;
    both mean "absent is None"."""
    out = {}
    for name, prop in props.items():
        prop = dict(prop)
        if prop.get("nullable") and "default" in prop and prop["default"] is None:
            del prop["default"]
        out[name] = prop
    return out


def test_static_schema_equals_the_runtime_schema():
    static = static_schema(ROOT / "predict.py")
    runtime = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]
    assert _normalized(static["Input"]["properties"]) == _normalized(runtime["Input"]["properties"])
    assert static["Input"].get("required") == runtime["Input"].get("required") == ["prompt"]
    for name in ("aspect_ratio", "output_format", "megapixels"):
        assert static[name] == runtime[name], name
    assert static["Output"] == runtime["Output"]


def test_predict_py_literals_equal_engine_inputs():
    props = static_schema(ROOT / "predict.py")["Input"]["properties"]
    schemas = static_schema(ROOT / "predict.py")
    assert schemas["aspect_ratio"]["enum"] == list(inputs.ASPECT_RATIOS)
    assert schemas["output_format"]["enum"] == list(inputs.OUTPUT_FORMATS)
    assert schemas["megapixels"]["enum"] == list(inputs.MEGAPIXELS)
    for name, bounds in (
        ("num_outputs", inputs.NUM_OUTPUTS),
        ("num_inference_steps", inputs.NUM_INFERENCE_STEPS),
        ("output_quality", inputs.OUTPUT_QUALITY),
        ("lora_scale", inputs.LORA_SCALE),
        ("extra_lora_scale", inputs.LORA_SCALE),
    ):
        assert (props[name]["minimum"], props[name]["maximum"]) == bounds, name
    # Lengths are the engine's to check (coglet's 422 would echo the value): no maxLength in the
    # schema, and the limits stated in the descriptions.
    assert not any("maxLength" in p for p in props.values())
    assert f"{inputs.MAX_PROMPT_CHARS:,} characters" in props["prompt"]["description"]
    assert f"{inputs.MAX_LORA_SOURCE_CHARS:,} characters" in props["lora_weights"]["description"]
    assert "same forms and limits" in props["extra_lora"]["description"]
    defaults = {name: p["default"] for name, p in props.items() if "default" in p}
    assert defaults == inputs.DEFAULTS
    # The service's own defaults (direct callers, tests) are the same values.
    from engine.service import FluxService

    signature = inspect.signature(FluxService.predict).parameters
    assert {name: signature[name].default for name in inputs.DEFAULTS} == inputs.DEFAULTS


# --- the emulation, on cases from cog's own tests (pkg/schema/python/parser_test.go, 0.23.1) -----
def test_cog_case_multiple_inputs_with_defaults(tmp_path):  # TestMultipleInputsWithDefaults
    s = _schema_of(
        tmp_path,
        'image: Path = Input(description="Grayscale input image"), '
        'scale: float = Input(description="Factor to scale image by", ge=0, le=10, default=1.5)',
    )
    assert _input(s, "image") == {
        "x-order": 0,
        "title": "Image",
        "type": "string",
        "format": "uri",
        "description": "Grayscale input image",
    }
    scale = _input(s, "scale")
    assert (scale["default"], scale["minimum"], scale["maximum"]) == (1.5, 0.0, 10.0)
    assert s["Input"]["required"] == ["image"]


@pytest.mark.parametrize(
    "header,choices,want",
    [
        ("", '["red", "green", "blue"]', ["red", "green", "blue"]),  # TestChoicesLiteralList
        ('MY_CHOICES = ["x", "y", "z"]\n', "MY_CHOICES", ["x", "y", "z"]),  # TestChoicesModuleLevelListVar
        (  # TestChoicesListDictKeys
            'ASPECT_RATIOS = {\n    "1:1": (1024, 1024),\n    "16:9": (1344, 768),\n    "2:3": (832, 1216),\n}\n',
            "list(ASPECT_RATIOS.keys())",
            ["1:1", "16:9", "2:3"],
        ),
        (
            'LABELS = {"fast": "Fast Mode", "slow": "Slow Mode"}\n',
            "list(LABELS.values())",
            ["Fast Mode", "Slow Mode"],
        ),
        (
            'SIZES = {"small": 256, "large": 1024}\n',
            'list(SIZES.keys()) + ["custom"]',
            ["small", "large", "custom"],
        ),
        ('BASE = ["a", "b"]\nEXTRA = ["c"]\n', "BASE + EXTRA", ["a", "b", "c"]),  # TestChoicesConcatTwoVars
    ],
)
def test_cog_cases_choices_resolved(tmp_path, header, choices, want):
    s = _schema_of(tmp_path, f"x: str = Input(choices={choices})", header)
    assert s["x"]["enum"] == want


@pytest.mark.parametrize(
    "header,choices",
    [
        ('NOT_A_LIST = "oops"\n', "NOT_A_LIST"),  # TestChoicesVarNotAListErrors
        ("", "DOES_NOT_EXIST"),  # TestChoicesUndefinedVarErrors
        ("", "get_choices()"),  # TestChoicesArbitraryCallErrors
        ("", '[f"{i}x" for i in range(5)]'),  # TestChoicesListComprehensionErrors
        ('def helper():\n    NESTED = ["a", "b"]\n', "NESTED"),  # TestChoicesNestedVarNotInScope
    ],
)
def test_cog_cases_choices_refused(tmp_path, header, choices):
    with pytest.raises(
        CogSchemaError, match="parameter 'x': choices expression cannot be statically resolved"
    ):
        _schema_of(tmp_path, f"x: str = Input(choices={choices})", header)


def test_cog_cases_module_level_defaults_and_descriptions(tmp_path):
    # TestDefaultModuleLevelStringInInput, ...IntInInput, TestDescriptionFromModuleLevelVar
    s = _schema_of(
        tmp_path,
        "ar: str = Input(default=DEFAULT_RATIO), steps: int = Input(default=DEFAULT_STEPS, description=STEP_DESC)",
        'DEFAULT_RATIO = "1:1"\nDEFAULT_STEPS = 50\nSTEP_DESC = "Number of denoising steps. 4 is recommended."\n',
    )
    assert _input(s, "ar")["default"] == "1:1" and _input(s, "steps")["default"] == 50
    assert _input(s, "steps")["description"] == "Number of denoising steps. 4 is recommended."
    with pytest.raises(
        CogSchemaError, match="cannot be statically resolved"
    ):  # TestDefaultUndefinedVarPlainErrors
        _schema_of(tmp_path, "text: str = UNDEFINED_VAR")


def test_cog_case_none_default_on_a_non_optional_type_is_required(tmp_path):
    # pkg/schema/openapi_spec_test.go: TestNoneDefaultOnRequiredTypeIsRequired and ...OptionalTypeEmitsNull
    s = _schema_of(tmp_path, "seed: int = Input(default=None), image: str | None = Input(default=None)")
    assert s["Input"]["required"] == ["seed"] and "default" not in _input(s, "seed")
    assert _input(s, "image")["default"] is None and _input(s, "image")["nullable"] is True


# --- the forms predict.py used before: each one refused or silently changed by cog -------------
def test_previous_forms_are_refused_or_dropped(tmp_path):
    header = "from engine import inputs as api\n"
    with pytest.raises(
        CogSchemaError, match="'aspect_ratio': choices expression cannot be statically resolved"
    ):
        _schema_of(
            tmp_path, 'aspect_ratio: str = Input(choices=list(api.ASPECT_RATIOS), default="1:1")', header
        )
    s = _schema_of(
        tmp_path,
        "steps: int = Input(ge=api.NUM_INFERENCE_STEPS[0], le=api.NUM_INFERENCE_STEPS[1], default=api.DEFAULT_STEPS), "
        'prompt: str = Input(description=f"at most {api.MAX_PROMPT_CHARS:,} characters", max_length=api.MAX_PROMPT_CHARS), '
        'seed: int = Input(description="Random seed; " "taken mod 2^32.", default=None)',
        header,
    )
    steps, prompt, seed = _input(s, "steps"), _input(s, "prompt"), _input(s, "seed")
    assert "minimum" not in steps and "maximum" not in steps  # bounds from engine.inputs: dropped
    assert "default" not in steps and "steps" in s["Input"]["required"]  # default=api.X: None, so required
    assert "description" not in prompt and "maxLength" not in prompt  # f-string and name: dropped
    assert seed["description"] == 'Random seed; " "taken mod 2^32.'  # concatenation: inner quotes kept
    assert "seed" in s["Input"]["required"]  # int with default None: required
