#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_run.sh installs on a GPU machine that cannot reach a
# package registry (Python 3.12, x86_64): the packages fewstep needs that its image lacks, at the
# versions this project's virtualenv runs. Run it here, in the repository root:
#
#     bash benchmarks/fetch_gpu_wheels.sh          # -> .whl/ (ignored by git)
#
# then carry `.whl` with the run (see benchmarks/README.md, "On a GPU").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
DEST=.whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p "$DEST"
PACKAGES=(
  diffusers==0.42.1
  pydantic==2.14.4 pydantic-core==2.50.5   # pydantic pins its core exactly
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  pydantic-settings==2.16.3 python-dotenv==1.2.4
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
ls -la "$DEST"
