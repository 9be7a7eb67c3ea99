#!/usr/bin/env bash
# Writes one apt source entry (deb822) for the Debian archive this machine
# already uses, so no script names a mirror:
#   apt-source.sh FILE TYPE SUITE
#   apt-source.sh /etc/apt/sources.list.d/balloon-backports.sources deb bookworm-backports
set -euo pipefail
usage="usage: apt-source.sh FILE deb|deb-src SUITE"
file=${1:?$usage}
type=${2:?$usage}
suite=${3:?$usage}
mirror=$(bash "$(dirname "$0")/debian-mirror.sh")
cat > "$file" <<SRC
Types: $type
URIs: $mirror
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
echo "$type $suite from $mirror"
