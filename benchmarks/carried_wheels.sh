# Sourced by the device-machine wrappers (tier_and_study.sh, teacher_duplicates.sh): install_carried_wheels puts the
# wheels carried in .whl/ (diffusers, imageio: the device machine lacks diffusers) into /tmp/site and exports it on
# PYTHONPATH; nothing when no wheel was carried. Returns pip's status.
install_carried_wheels() {
  ls .whl/*.whl > /dev/null 2>&1 || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
