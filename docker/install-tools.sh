#!/usr/bin/env bash
# Installs the tools that tests/deploy runs on the deployment configs, where they are missing:
# nginx (Debian package nginx-light), promtool (prometheus) and docker-compose (docker-compose).
# hadolint and kubernetes-validate are Python packages pinned in requirements/ (`make setup`).
#
# Installs only as root on a machine with apt-get; anywhere else it says what is missing and
# that the tests needing it will skip. Idempotent: with everything present it only looks.
#
#   bash docker/install-tools.sh      (`make tools`; `make test` runs it)
set -euo pipefail

# tool -> the Debian package that provides it
declare -A PACKAGE=(
    [nginx]=nginx-light
    [promtool]=prometheus
    [docker-compose]=docker-compose
)
TOOLS=(nginx promtool docker-compose)

have() {
    # nginx lives in /usr/sbin, which a non-root PATH often lacks (the tests look there too).
    command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" || -x "/sbin/$1" ]]
}

missing_tools=()
missing_packages=()
for tool in "${TOOLS[@]}"; do
    if ! have "$tool"; then
        missing_tools+=("$tool")
        missing_packages+=("${PACKAGE[$tool]}")
    fi
done

if ((${#missing_tools[@]} == 0)); then
    echo "install-tools: nginx, promtool and docker-compose are installed"
    exit 0
fi

if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    why="not root"
    command -v apt-get >/dev/null 2>&1 || why="no apt-get on this machine"
    for tool in "${missing_tools[@]}"; do
        echo "install-tools: $tool is missing (Debian package ${PACKAGE[$tool]}; $why):" \
            "the tests/deploy checks that need it will skip" >&2
    done
    if command -v apt-get >/dev/null 2>&1; then
        echo "install-tools: to install: sudo apt-get install -y --no-install-recommends" \
            "${missing_packages[*]}" >&2
    fi
    exit 0
fi

echo "install-tools: installing ${missing_packages[*]} (for ${missing_tools[*]})"
# Installing a daemon's package must not start it (Debian's nginx would listen on :80, the
# prometheus package would start scraping): a policy-rc.d that says no, while apt-get runs,
# unless the machine already has one.
policy=/usr/sbin/policy-rc.d
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# Temporary, from docker/install-tools.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
# A failed install (no network, a broken mirror) must not fail `make test`: the checks that
# need the tool skip, saying why.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing_packages[@]}"; }; then
    echo "install-tools: apt-get could not install ${missing_packages[*]}" >&2
fi

for tool in "${missing_tools[@]}"; do
    if ! have "$tool"; then
        echo "install-tools: $tool is still missing after installing ${PACKAGE[$tool]}:" \
            "the tests/deploy checks that need it will skip" >&2
    fi
done
