#!/usr/bin/env bash
# Fetch Debian packages that ship sample videos and keep only their videos, in a cache folder:
#   bash tests/fetch_sample_videos.sh DEST PACKAGE...     (the Makefile's `make sample-videos`)
# Uses `apt-get download` (no root needed once the package lists exist: `apt-get update`) and
# dpkg-deb. DEST/PACKAGE/ gets each package's videos, DEST/SOURCES.txt says which versions; the
# folder is built beside DEST and renamed into place, so it is whole or absent.
set -euo pipefail
dest=$1
shift
tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$tmp/debs"
if ! (cd "$tmp/debs" && apt-get download "$@"); then
  echo "apt-get download $* failed (Debian/Ubuntu only; run 'apt-get update' first)" >&2
  exit 1
fi
videos='\.(avi|mp4|m4v|mov|mkv|webm|mpg|mpeg|ogv|ts|mts|flv|wmv|3gp)$'
for deb in "$tmp"/debs/*.deb; do
  pkg=$(dpkg-deb -f "$deb" Package)
  mkdir -p "$tmp/$pkg"
  dpkg-deb --fsys-tarfile "$deb" | tar -t | grep -iE "$videos" > "$tmp/list" || true
  if [ -s "$tmp/list" ]; then       # extract only the videos, flattened into DEST/PACKAGE/
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/$pkg" -T "$tmp/list" --transform 's,.*/,,'
  fi
  echo "$pkg $(dpkg-deb -f "$deb" Version): $(wc -l < "$tmp/list") videos" >> "$tmp/SOURCES.txt"
done
rm -rf "$tmp/debs" "$tmp/list"
rm -rf "$dest"
mv "$tmp" "$dest"
