#!/usr/bin/env bash
# Installs Nsight Systems (Debian's `nsight-systems`, 2022.4 on bookworm, component non-free) on a
# fresh Debian bookworm machine of the CPU kind, as root: the steps of ../shared/ENVIRONMENT.md,
# "Nsight Systems on the CPU machine". Idempotent: it does nothing when nsys already works (its
# version prints and its report importer is where nsys looks for it), and each step checks
# before it changes anything, so a half-finished run can simply be run again.
#
# Used by `make nsys`. The profiler finds nsys by itself (profiler/nsys/tool.py); this script
# only puts it in the usual place, /usr/bin/nsys.
set -euo pipefail

SOURCES=/etc/apt/sources.list.d/debian.sources
# Debian's nsys looks for its importer (QdstrmImporter) beside its target folder; the package
# puts it elsewhere. Without the link a capture stops at a .qdstrm and no .nsys-rep is written.
IMPORTER_DIR=/usr/lib/nsight-systems/host-linux-x64
IMPORTER_LINK=/usr/lib/x86_64-linux-gnu/nsight-systems/host-linux-x64

nsys_works() {
    command -v nsys >/dev/null 2>&1 && nsys --version >/dev/null 2>&1 \
        && [ -x "$IMPORTER_LINK/QdstrmImporter" ]
}

if nsys_works; then
    echo "install_nsys: nsys already works: $(command -v nsys) ($(nsys --version 2>&1 | head -n 1)); nothing to do"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_nsys: needs root (apt-get and a link under /usr/lib); run it as root, e.g. sudo make nsys" >&2
    exit 1
fi

if ! command -v nsys >/dev/null 2>&1 || [ ! -d "$IMPORTER_DIR" ]; then
    # Step 1: the non-free component of the stanza apt already uses for bookworm.
    if [ ! -f "$SOURCES" ]; then
        echo "install_nsys: expected Debian's deb822 source list $SOURCES (Debian bookworm); it is missing" >&2
        exit 1
    fi
    if ! grep -q '^Suites: bookworm bookworm-updates$' "$SOURCES"; then
        echo "install_nsys: expected a stanza 'Suites: bookworm bookworm-updates' in $SOURCES; found none" >&2
        exit 1
    fi
    # Only the Components line of that stanza (from its Suites line to the next Components line).
    sed -i '/^Suites: bookworm bookworm-updates$/,/^Components:/ {
        /^Components:/ { / non-free\( \|$\)/! s/$/ non-free/; / contrib\( \|$\)/! s/^Components: main/Components: main contrib/ }
    }' "$SOURCES"
    echo "install_nsys: $SOURCES: $(sed -n '/^Suites: bookworm bookworm-updates$/,/^Components:/ { /^Components:/p }' "$SOURCES")"
    apt-get update -q
    # Step 2: recommends would add desktop packages the command-line tool does not need.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nsight-systems
fi

# Step 3: the importer link.
if [ ! -d "$IMPORTER_DIR" ]; then
    echo "install_nsys: the package installed no $IMPORTER_DIR; this script knows Debian's 2022.4 layout only" >&2
    exit 1
fi
mkdir -p "$(dirname "$IMPORTER_LINK")"
ln -sfn "$IMPORTER_DIR" "$IMPORTER_LINK"

if ! nsys_works; then
    echo "install_nsys: installed, but nsys still does not run (nsys --version, $IMPORTER_LINK/QdstrmImporter)" >&2
    exit 1
fi
echo "install_nsys: $(command -v nsys): $(nsys --version 2>&1 | head -n 1)"
