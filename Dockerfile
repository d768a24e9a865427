# CUDA runtime image with PyTorch; MuJoCo comes from its pip wheel (no mujoco-py, no system GL needed).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# MUJOCO_GL=disable: the scripts never render, and asking for EGL on an image without libEGL makes
# `import mujoco` fail at the first env ('NoneType' object has no attribute 'eglQueryString').
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MUJOCO_GL=disable

WORKDIR /workspace
COPY requirements/ requirements/
# torch is already in the image and satisfies the range in runtime.txt, so pip keeps it.
RUN pip install --no-cache-dir -r requirements/runtime.txt
COPY algorithms/ algorithms/
COPY configs/ configs/
COPY data/ data/
COPY tools/ tools/
COPY scripts/ scripts/
COPY benchmarks/ benchmarks/

ENTRYPOINT ["python"]
CMD ["algorithms/offline/cql.py", "--help"]
