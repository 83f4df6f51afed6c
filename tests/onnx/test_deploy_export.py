"""export_onnx: files written atomically, valid, batch-dynamic, with the plan recorded; plan errors;
and the size a plan saves, on a small model."""

from __future__ import annotations

import json
import os

import onnx
import pytest
from deploy_models import ROOT, rel_l2, run_onnx

from autoprec.api import tune
from autoprec.ort.providers import kernel
from autoprec.core.errors import PlanError, UsageError
from autoprec.deploy.export import apply_plan_onnx, export_onnx
from autoprec.onnx.apply import recorded_plan
from autoprec.core.formats import Precision
from autoprec.torch.spec import load_model_spec
from autoprec.torch.passes import apply_plan

MODEL = ROOT / "models" / "digits_cnn.py"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A real tune run of digits_cnn: plan.json and profile.json."""
    out = tmp_path_factory.mktemp("tuned")
    result = tune(MODEL, "0.5%")
    plan = result.plan.save(out / "plan.json")
    prof = out / "profile.json"
    prof.write_text(result.profile.to_json())
    return result, plan, prof


def test_export_deploy_and_emulation_files(tuned, tmp_path) -> None:
    result, plan_path, prof_path = tuned
    out = export_onnx(MODEL, plan_path, prof_path, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx" and sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temp files left
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain or "": o.version for o in model.opset_import}[""] == 21 and model.ir_version <= 10
    mode, assignment, amax = recorded_plan(model)
    assert mode == "deploy" and assignment == result.plan.assignment
    assert set(amax) == {k for k, f in assignment.items() if f.is_fp8}
    keys = {p.key for n in model.graph.node for p in n.metadata_props}
    assert keys <= {"autoprec.layer", "autoprec.format", "autoprec.inserted", "autoprec.reason"}
    # graph inputs and outputs fp32, batch dimension symbolic
    for v in list(model.graph.input) + list(model.graph.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert v.type.tensor_type.shape.dim[0].dim_param
    emu = export_onnx(MODEL, plan_path, prof_path, tmp_path / "e.onnx", emulation=True)
    x = load_model_spec(MODEL).calibration_data()[0][0]
    want = result.module(x).detach().numpy()  # the torch emulation of the tuned plan
    for n in (1, 5):  # any batch size runs
        got = run_onnx(onnx.load(str(emu)), x[:n])
        assert got.shape == (n, 10) and rel_l2(got, want[:n]) < 1e-3


def test_plan_errors(tuned, tmp_path, zoo) -> None:
    _, plan_path, _ = tuned
    fp8 = {"conv1": "fp8", "fc2": "bf16"}
    with pytest.raises(PlanError, match="conv1 in fp8: give the profile.json"):
        export_onnx(MODEL, fp8, None, tmp_path / "x.onnx")
    with pytest.raises(PlanError, match="does not fit"):
        export_onnx(ROOT / "models" / "cancer_mlp.py", plan_path, None, tmp_path / "x.onnx")
    with pytest.raises(UsageError, match="opset 18 has no fp8"):
        export_onnx(MODEL, {}, None, tmp_path / "x.onnx", opset=18)
    assert not (tmp_path / "x.onnx").exists()


def test_bytes_of_a_small_model(zoo) -> None:
    """digits_cnn (156k weights): every layer 16-bit halves the file, fp8 quarters it."""
    case = zoo("digits_cnn")
    amax = case.amax
    fp32 = apply_plan_onnx(case.fp32, case.captured, {}, amax).ByteSize()
    for fmt, bound in ((Precision.BF16, 0.52), (Precision.FP16, 0.52), (Precision.FP8_E4M3, 0.28)):
        size = apply_plan_onnx(case.fp32, case.captured, case.uniform(fmt), amax).ByteSize()
        assert size <= bound * fp32, (fmt, size / fp32)


def test_keep_metadata_and_deploy_fp16_on_cpu(zoo) -> None:
    case = zoo("digits_cnn")
    plan = case.uniform(Precision.FP16)
    full = apply_plan_onnx(case.fp32, case.captured, plan, case.amax, keep_metadata=True)
    keys = {p.key for n in full.graph.node for p in n.metadata_props}
    assert {"pkg.torch.onnx.name_scopes", "autoprec.group", "autoprec.policy"} <= keys
    # ORT's CPU provider runs an fp16 deployment graph (without the fp16 roundings: close, not equal)
    x = case.spec.calibration_data()[0][0]
    got = run_onnx(full, x)
    want = apply_plan(case.captured, plan, case.amax)(x).detach().numpy()
    assert rel_l2(got, want) < Precision.FP16.eps
    assert json.loads({p.key: p.value for p in full.metadata_props}["autoprec.assignment"])["conv1"] == "fp16"


def test_bytes_of_the_language_model(zoo) -> None:
    """char_transformer: its embedding tables are plan layers too, so every layer in 16 bits takes at
    most 0.52x of the fp32 file (0.533x while the tables stayed fp32), and every layer in fp8 at
    most 0.285x (0.293x while the tables stayed bf16; fp8 tables store a byte per element)."""
    case = zoo("char_transformer")
    fp32 = apply_plan_onnx(case.fp32, case.captured, {}, case.amax).ByteSize()
    for fmt, bound in ((Precision.BF16, 0.52), (Precision.FP16, 0.52), (Precision.FP8_E4M3, 0.285)):
        size = apply_plan_onnx(case.fp32, case.captured, case.uniform(fmt), case.amax).ByteSize()
        assert size <= bound * fp32, (fmt, size / fp32)


def _producer(model: onnx.ModelProto, value: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if value in n.output)


def test_a_16_bit_layer_on_an_fp32_kernel_reads_rounded_inputs(zoo) -> None:
    """ONNX Conv has no bf16: a bf16 convolution computes in fp32, on its input rounded to bf16
    (a Cast to bf16 and back), as the plan's numerics say."""
    case = zoo("digits_cnn")
    model = apply_plan_onnx(case.fp32, case.captured, {name: Precision.BF16 for name in case.layers}, case.amax)
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs:
        widen = _producer(model, conv.input[0])
        assert widen.op_type == "Cast" and widen.attribute[0].i == onnx.TensorProto.FLOAT
        assert types[widen.input[0]] == onnx.TensorProto.BFLOAT16, conv.name


def test_deployment_graph_follows_the_providers_kernels(zoo) -> None:
    """Written for ORT's CUDA provider, an all-bf16 language model runs its MatMuls in bf16 (CUDA has
    them) and its Gelu in fp32 between casts (CUDA has no bf16 Gelu in autoprec's table); the file
    records the provider."""
    case = zoo("char_transformer")
    plan = {name: Precision.BF16 for name in case.layers}
    generic = apply_plan_onnx(case.fp32, case.captured, plan, case.amax)
    cuda = apply_plan_onnx(case.fp32, case.captured, plan, case.amax, provider="cuda")
    onnx.checker.check_model(cuda, full_check=True)

    def input_types(model: onnx.ModelProto, op: str) -> set[int]:
        types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        return {types.get(n.input[0]) for n in model.graph.node if n.op_type == op}

    assert input_types(generic, "Gelu") == {onnx.TensorProto.BFLOAT16}
    gelu_bf16 = kernel("Gelu", Precision.BF16, "cuda").ok  # not in the built-in table; a live registry may say so
    assert input_types(cuda, "Gelu") == {onnx.TensorProto.BFLOAT16 if gelu_bf16 else onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.BFLOAT16 in input_types(cuda, "MatMul")
    assert {p.key: p.value for p in cuda.metadata_props}["autoprec.provider"] == "CUDAExecutionProvider"
