# CUDA runtime image with PyTorch; MuJoCo comes from its pip wheel (no mujoco-py, no system GL needed).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# MUJOCO_GL=disable: the scripts never render, and asking for EGL on an image without libEGL makes
# `import mujoco` fail at the first env ('NoneType' object has no attribute 'eglQueryString').
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MUJOCO_GL=disable

# A host compiler for torch.compile (the scripts' default on cuda): PyTorch's runtime images had none until
# December 2025 (pytorch issue #116696), and Inductor builds code at run time. On cuda, Triton compiles each
# kernel's launcher stub with $CC, else gcc, else clang, against the C headers (libc6-dev); on the CPU,
# Inductor compiles its kernels with $CXX, else g++. The g++ package brings both: gcc, g++, libc6-dev and
# libstdc++'s headers, and no make or dpkg-dev (build-essential's extras, which nothing here uses).
# (Triton links -lcuda against the libcuda.so that the NVIDIA container toolkit mounts at run time.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY requirements/ requirements/
# torch is already in the image and satisfies the range in runtime.txt, so pip keeps it. tools.txt:
# matplotlib, for tools/results.py's plots (tools/ is in the image).
RUN pip install --no-cache-dir -r requirements/runtime.txt -r requirements/tools.txt
COPY algorithms/ algorithms/
COPY configs/ configs/
COPY data/ data/
COPY tools/ tools/
COPY scripts/ scripts/
COPY benchmarks/ benchmarks/

ENTRYPOINT ["python"]
CMD ["algorithms/offline/cql.py", "--help"]
