#!/usr/bin/env bash
# The main job on the built-in data, step by step.
set -euo pipefail
BIN=.venv/bin
$BIN/fintwin data summary cdnow
$BIN/fintwin data summary synthetic
