#!/usr/bin/env bash
# Prints the URI of the Debian archive this machine's apt already uses for
# bookworm, whether its sources are deb822 (`debian.sources`, as on cloud
# images) or one-line (`/etc/apt/sources.list`, as a Debian 12 installer or
# debootstrap leaves them), so that no script names a mirror itself.
set -euo pipefail
for suite in bookworm stable; do
  uri=$(apt-get indextargets --format '$(REPO_URI)' "Release: $suite" 'Target-Of: deb' 2>/dev/null | head -n 1)
  if [ -n "$uri" ]; then
    echo "${uri%/}"
    exit 0
  fi
done
echo "debian-mirror: apt has no 'deb' source for bookworm (see /etc/apt/sources.list and /etc/apt/sources.list.d/)" >&2
exit 1
