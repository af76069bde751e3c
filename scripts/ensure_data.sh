#!/usr/bin/env bash
# Offline machines: when upstream Fashion-MNIST cannot be reached and no local
# copy exists, install Debian's dataset-fashion-mnist package (if apt works).
# The download stage then finds it under /usr/share/datasets and verifies it.
set -uo pipefail
dir=/usr/share/datasets/fashion-mnist
url=http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/
dataset=$(.venv/bin/python -c "from cnnpipe.params import load_params; print(load_params().data.dataset)" 2>/dev/null || echo fashion-mnist)
[ "$dataset" = "fashion-mnist" ] || exit 0
[ -d data/raw/fashion-mnist ] && exit 0
[ -f "$dir/train-images-idx3-ubyte.gz" ] && { echo "data: using the local Fashion-MNIST copy in $dir"; exit 0; }
if curl -sfI --max-time 5 "$url" >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "data: upstream Fashion-MNIST is unreachable; installing Debian's dataset-fashion-mnist package into $dir"
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }) \
    && echo "data: installed $dir (the download stage verifies its decompressed content)" \
    || echo "data: could not install dataset-fashion-mnist; the download stage will try the other sources"
else
  echo "data: upstream unreachable and apt unavailable; the download stage will try data.mirrors and upstream"
fi
