#!/usr/bin/env bash
# Builds PgBouncer >= 1.21 (max_prepared_statements) from Debian trixie's source package, with
# Debian's patches, into <repo>/.tmp/pgbouncer-<version>/ (git-ignored). Bookworm ships 1.18 only.
# Idempotent: skips when a build >= 1.21 is already there. Run as root (installs build deps).
# Prints the binary's path and version on the last line.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out_root=${PGBOUNCER_BUILD_ROOT:-$repo/.tmp}
mkdir -p "$out_root"

# An existing build of a new enough version is enough.
for bin in "$out_root"/pgbouncer-*/bin/pgbouncer; do
  [ -x "$bin" ] || continue
  version=$("$bin" --version | head -n 1 | awk '{print $2}')
  if [ "$(printf '%s\n1.21\n' "$version" | sort -V | head -n 1)" = 1.21 ]; then
    echo "already built: $bin $version"
    exit 0
  fi
done

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive

# Build dependencies (a subset of the package's Build-Depends: no docs, PAM or systemd).
deps="build-essential pkg-config dpkg-dev libevent-dev libssl-dev libc-ares-dev"
missing=$(for p in $deps; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done)
if [ -n "$missing" ]; then
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >"$out_root/pgbouncer-deps.log" 2>&1 \
    || { cat "$out_root/pgbouncer-deps.log"; exit 1; }
fi

work=$(mktemp -d /tmp/qm-pgbouncer-build.XXXXXX)
trap 'rm -rf "$work"' EXIT

# A private apt state with only trixie's deb-src line, so the system's sources stay untouched.
mkdir -p "$work/apt/parts" "$work/apt/lists/partial" "$work/apt/cache" "$work/src"
: > "$work/apt/empty.list"
cat > "$work/apt/parts/trixie-src.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/empty.list" -o "Dir::Etc::SourceParts=$work/apt/parts"
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update -qq
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only -qq pgbouncer >/dev/null)

dsc=$(ls "$work"/src/pgbouncer_*.dsc)
# dpkg-source unpacks the orig tarball and applies debian/patches (the security fixes).
(cd "$work/src" && dpkg-source --no-check -x "$dsc" tree >/dev/null)
version=$(sed -n 's/^Version: \([^-]*\)-.*/\1/p' "$dsc")
dest=$out_root/pgbouncer-$version

cd "$work/src/tree"
./configure --prefix="$dest" --with-cares=yes --without-pam --without-systemd >"$work/configure.log" 2>&1 \
  || { tail -n 30 "$work/configure.log"; exit 1; }
make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -n 30 "$work/make.log"; exit 1; }
rm -rf "$dest"
make install >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log"; exit 1; }

echo "built in $(( $(date +%s) - start )) s: $dest/bin/pgbouncer $("$dest/bin/pgbouncer" --version | head -n 1 | awk '{print $2}')"
