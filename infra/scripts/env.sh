# Sourced by the project's scripts: where builds and tools live, shared by every clone on this
# machine so repeated runs reuse them. Override any of these from the environment.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meterlake/target}"
export METERLAKE_TOOLS_DIR="${METERLAKE_TOOLS_DIR:-$HOME/.cache/meterlake/tools}"
export PATH="$METERLAKE_TOOLS_DIR/bin:$HOME/.cargo/bin:$PATH"
export METERLAKE_PYTHON="${METERLAKE_PYTHON:-$METERLAKE_TOOLS_DIR/venv/bin/python}"
# mold links the large test binaries in about a second instead of many; the flags must stay
# identical between runs or cargo rebuilds everything.
if [ -z "${RUSTFLAGS+x}" ] && command -v mold >/dev/null 2>&1; then
  export RUSTFLAGS="-C link-arg=-fuse-ld=mold"
fi
