"""bench/cublaslt.py reads cuBLASLt's enum values from the headers instead of writing them down (they moved
between cuBLAS releases): its parser on a header written here, and its refusal of headers too old to have
the outer-vector scales the engine's GEMM uses. The GEMMs themselves need a GPU (bench/gemm_algos.py)."""

from __future__ import annotations

import sys

import pytest

from bench import cublaslt

HEADER = """
typedef enum {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,   /* not CUBLASLT_MATMUL_DESC_TRANSA = 99 in a comment after it */
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_A_SCALE_MODE = 31,
} cublasLtMatmulDescAttributes_t;
typedef enum { CUBLASLT_EPILOGUE_RELU_AUX = (CUBLASLT_EPILOGUE_RELU | 128), CUBLASLT_EPILOGUE_BIAS = 4 } e;
"""
LIBRARY_TYPES = "typedef enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14, CUDA_R_8F_E4M3 = 28 } t;"
CUBLAS_API = "#define CUBLAS_VER_MAJOR 13\n#define CUBLAS_VER_MINOR 1\ntypedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } o;"


@pytest.fixture
def headers(tmp_path, monkeypatch):
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "cublasLt.h").write_text(HEADER)
    (inc / "library_types.h").write_text(LIBRARY_TYPES)
    (inc / "cublas_api.h").write_text(CUBLAS_API)
    monkeypatch.setattr(cublaslt, "_header_dirs", lambda: [inc])
    return inc


def test_enums_read_from_the_headers(headers):
    values, where = cublaslt.enums()
    assert where == str(headers)
    assert values["CUBLASLT_MATMUL_DESC_TRANSA"] == 3  # the declaration, not the comment's later "= 99"
    assert values["CUBLASLT_MATMUL_DESC_A_SCALE_MODE"] == 31
    assert values["CUBLASLT_EPILOGUE_BIAS"] == 4
    assert "CUBLASLT_EPILOGUE_RELU_AUX" not in values  # an expression, not a number: left out
    assert (values["CUDA_R_8F_E4M3"], values["CUBLAS_OP_T"], values["CUBLAS_VER_MAJOR"]) == (28, 1, 13)


def test_headers_split_across_folders_are_all_read(tmp_path, monkeypatch):
    # the nvidia wheels put cublasLt.h with cuBLAS and library_types.h with the CUDA runtime
    blas, runtime = tmp_path / "cublas" / "include", tmp_path / "cuda_runtime" / "include"
    blas.mkdir(parents=True)
    runtime.mkdir(parents=True)
    (blas / "cublasLt.h").write_text(HEADER)
    (blas / "cublas_api.h").write_text(CUBLAS_API)
    (runtime / "library_types.h").write_text(LIBRARY_TYPES)
    monkeypatch.setattr(cublaslt, "_header_dirs", lambda: [runtime, blas])
    values, where = cublaslt.enums()
    assert where == str(blas)  # the folder cublasLt.h came from
    assert values["CUDA_R_16BF"] == 14 and values["CUBLASLT_MATMUL_DESC_TRANSB"] == 4


def test_wheels_come_before_cuda_home(tmp_path, monkeypatch):
    site, home = tmp_path / "site", tmp_path / "cuda"
    (site / "nvidia" / "cublas" / "include").mkdir(parents=True)
    (home / "include").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(site)])
    monkeypatch.setenv("CUDA_HOME", str(home))
    dirs = cublaslt._header_dirs()
    assert dirs.index(site / "nvidia" / "cublas" / "include") < dirs.index(home / "include")


def test_headers_without_outer_vector_scales_are_refused(tmp_path, monkeypatch):
    # everything the GEMM uses but the outer-vector scale mode (cuBLAS before 12.9): that name, and only it
    inc = tmp_path / "include"
    inc.mkdir()
    lines = [f"  {name} = {i}," for i, name in enumerate(cublaslt.USED) if name != "CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F"]
    (inc / "cublasLt.h").write_text("typedef enum {\n" + "\n".join(lines) + "\n} all_but_one;\n")
    monkeypatch.setattr(cublaslt, "_header_dirs", lambda: [inc])
    with pytest.raises(RuntimeError) as err:
        cublaslt.versions()
    assert "['CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F']" in str(err.value)


def test_no_headers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cublaslt, "_header_dirs", lambda: [])
    with pytest.raises(RuntimeError, match="cublasLt.h not found"):
        cublaslt.enums()
