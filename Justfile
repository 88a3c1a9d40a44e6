# SAT deployment monorepo. Every recipe creates or updates the virtualenv it needs (.venv).
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
# The CPU build of torch goes in first, so no later requirement pulls a multi-GB CUDA build.
torch_pin := "torch==2.13.0"
demo_dir := "demo_output"

# List the recipes.
default:
    @just --list

# Create or update .venv with the project and the given extras (re-runs only when pyproject.toml changes).
env extras="dev":
    #!/usr/bin/env bash
    set -euo pipefail
    [ -x {{bin}}/python ] || python3 -m venv {{venv}}
    stamp="{{venv}}/.installed-{{extras}}-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "Installing satseg[{{extras}}] into {{venv}} (first run takes a few minutes)…"
        {{bin}}/python -m pip install -q --disable-pip-version-check "{{torch_pin}}"
        {{bin}}/python -m pip install -q --disable-pip-version-check -e ".[{{extras}}]"
        touch "$stamp"
    fi

# Lint and run the whole test suite on the CPU.
test: (env "dev")
    {{bin}}/ruff check .
    {{bin}}/pytest

# Segment the demo CT in-process and write masks, a label map, statistics and a PNG preview.
demo: (env "dev")
    {{bin}}/sat-phantom -o {{demo_dir}}/phantom_ct.nii.gz --rotate 12
    {{bin}}/sat-checkpoint init --size tiny --output {{demo_dir}}/checkpoint-tiny-untrained --if-missing
    {{bin}}/sat-segment -i {{demo_dir}}/phantom_ct.nii.gz -o {{demo_dir}}/segmentation \
        --checkpoint {{demo_dir}}/checkpoint-tiny-untrained \
        --prompts "liver,spleen,left kidney,right kidney" --modality ct --ml --statistics --preview
    @echo "Open {{demo_dir}}/segmentation/preview.png to look at the result."

# Measure peak memory of the whole sat-segment path on a 512x512x300 CT with 32 prompts.
bench-memory: (env "dev")
    {{bin}}/python benchmarks/memory_segment.py
