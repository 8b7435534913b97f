#!/usr/bin/env bash
# Run where pip reaches a package registry, before gpu_checks.sh on an offline GPU machine whose image
# has JAX, Flax, Optax and Orbax but not these dependencies of radsam-jax. Downloads their Python 3.12
# x86-64 wheels into .whl/ (git-ignored, ~10 MB); copy it beside the code there, and gpu_checks.sh
# installs what is missing from it:
#
#   bash benchmarks/gpu_wheels.sh      # then, on the GPU machine: bash benchmarks/gpu_checks.sh OUT
set -eu
cd "$(dirname "$0")/.."
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# Into a fresh folder that then replaces .whl/: a stale second version of a wheel left there would
# make the device's `pip install --target` fail (ResolutionImpossible).
new="$(mktemp -d)"
trap 'rm -rf "$new"' EXIT
# The versions this project's tests run with; their dependencies the image has (absl-py, etils, numpy,
# protobuf, cloudpickle, packaging, pyyaml), except portpicker.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$new" grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 nibabel==5.4.2 ml-collections==1.1.0 \
  tensorboardX==2.6.5 pydicom==3.0.2
chmod 755 "$new"
rm -rf .whl
mv "$new" .whl
ls .whl
