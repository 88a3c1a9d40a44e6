# SAT deployment monorepo. Every recipe creates or updates the virtualenv it needs (.venv).
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
# The CPU build of torch goes in first, so no later requirement pulls a multi-GB CUDA build.
torch_pin := "torch==2.13.0"
demo_dir := "demo_output"
# The last commit whose models/demo holds the previous bundled demo model (stage 7), evaluate-demo's baseline.
previous_demo_commit := "4c9800d"
brain_prompts := "cerebral white matter,cerebral cortex,lateral ventricle,thalamus,cerebellum cortex,cerebellum white matter,brain-stem"

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

# Lint, run the whole test suite on the CPU, then the training smoke run.
test: (env "dev")
    {{bin}}/ruff check .
    {{bin}}/pytest
    {{just_executable()}} train-smoke

# Six training steps of the tiny model on synthetic torso CTs, in a temporary folder (CPU, about a minute).
train-smoke: (env "dev")
    #!/usr/bin/env bash
    set -euo pipefail
    run=$(mktemp -d)
    trap 'rm -rf "$run"' EXIT
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread each: 2-core CI machines stall with two
    {{bin}}/python -m satseg_training.train --config training/configs/smoke.toml --output "$run"
    {{bin}}/python -m satseg_training.train --config training/configs/smoke.toml --output "$run" --resume train.steps=8
    test -f "$run/checkpoint/model.safetensors"

# Standardise the real data beside the repository (../shared/data) into data/standardised for training.
standardise-shared: (env "dev")
    {{bin}}/sat-standardise -o data/standardised --labelmap ../shared/data/totalseg/example_ct.nii.gz \
        ../shared/data/totalseg/example_seg_fast_force_split.nii.gz ../shared/data/totalseg/classes_total.json \
        --modality ct --dataset totalseg_ct
    {{bin}}/sat-standardise -o data/standardised --labelmap ../shared/data/totalseg/example_mr_sm.nii.gz \
        ../shared/data/totalseg/example_seg_mr.nii.gz ../shared/data/totalseg/classes_total_mr.json \
        --modality mri --dataset totalseg_mr
    {{bin}}/sat-standardise -o data/standardised --synthseg ../shared/data/synthseg

# Knowledge pretraining of the text encoder (a few minutes on CPU); writes runs/pretrain_text.
pretrain-text: (env "dev")
    {{bin}}/sat-pretrain-text --output runs/pretrain_text

# Train the demo model on the standardised real data in seven stages (training/configs/demo.toml, then
# demo_finetune.toml with augmentation, demo_edges.toml with field-of-view edges, demo_t1.toml and
# demo_t1_focus.toml with T1-ordered synthetic brains, demo_balance.toml back on the even mix,
# demo_ct_focus.toml with more CT and more edge crops); resumable per stage.
train-demo: standardise-shared
    [ -f runs/pretrain_text/text_encoder_layers.safetensors ] || {{just_executable()}} pretrain-text
    {{bin}}/sat-train --config training/configs/demo.toml --output runs/demo
    {{bin}}/sat-train --config training/configs/demo_finetune.toml --output runs/demo_finetune \
        'model.init_from="runs/demo/checkpoint"'
    {{bin}}/sat-train --config training/configs/demo_edges.toml --output runs/demo_edges
    {{bin}}/sat-train --config training/configs/demo_t1.toml --output runs/demo_t1
    {{bin}}/sat-train --config training/configs/demo_t1_focus.toml --output runs/demo_t1_focus
    {{bin}}/sat-train --config training/configs/demo_balance.toml --output runs/demo_balance
    {{bin}}/sat-train --config training/configs/demo_ct_focus.toml --output runs/demo_ct_focus

# Copy a trained checkpoint (default: the demo run's) into models/demo, where sat-segment finds it by default.
bundle-demo checkpoint="runs/demo_ct_focus/checkpoint": (env "dev")
    mkdir -p models/demo
    cp {{checkpoint}}/config.json {{checkpoint}}/model.safetensors models/demo/
    {{bin}}/sat-checkpoint info models/demo

# The previous bundled demo model (stage 7), from git history, as the baseline evaluate-demo compares against.
previous-demo:
    #!/usr/bin/env bash
    set -euo pipefail
    mkdir -p runs/previous_demo
    for file in config.json model.safetensors; do
        git show "{{previous_demo_commit}}:models/demo/$file" > "runs/previous_demo/$file" || {
            echo "previous-demo: commit {{previous_demo_commit}} is not in this clone's history; fetch it (git fetch --unshallow)" >&2
            exit 1
        }
    done

# The model card's tables for a checkpoint (default: the bundled one), each beside the previous bundled model
# scored in the same run: the training CT on its own grid and rotated 15 degrees, the held-out aorta crop CT,
# the real MNI152 T1 against nilearn's tissue masks, and the held-out SynthSeg maps 17-20 synthesised with
# any contrast and with T1-ordered tissues (each lateralised structure, and the seven bilateral ones).
# Writes runs/evaluate-demo/*/evaluation.md.
evaluate-demo checkpoint="models/demo" baseline="runs/previous_demo": standardise-shared
    [ -f {{baseline}}/model.safetensors ] || {{just_executable()}} previous-demo
    {{bin}}/sat-evaluate --checkpoint {{checkpoint}} --baseline {{baseline}} --output runs/evaluate-demo/ct \
        --geometry oblique15 --case ../shared/data/totalseg/example_ct.nii.gz \
        ../shared/data/totalseg/example_seg_fast_force_split.nii.gz ../shared/data/totalseg/classes_total.json ct \
        --prompts "liver,spleen,left kidney,right kidney,stomach,aorta"
    {{bin}}/sat-evaluate --checkpoint {{checkpoint}} --baseline {{baseline}} --output runs/evaluate-demo/heldout-ct \
        --mask-case ../shared/data/totalseg/aorta_crop/ct_cropped.nii.gz ../shared/data/totalseg/aorta_crop/aorta.nii.gz ct \
        --prompts aorta
    {{bin}}/sat-evaluate --checkpoint {{checkpoint}} --baseline {{baseline}} --output runs/evaluate-demo/mni152 \
        --mni152 --prompts "labelled,cerebral white matter,cerebral cortex"
    for contrast in any t1; do \
        {{bin}}/sat-evaluate --checkpoint {{checkpoint}} --baseline {{baseline}} \
            --output runs/evaluate-demo/synthseg-$contrast --contrast $contrast \
            --standardised data/standardised --prompts "labelled,{{brain_prompts}}" \
            --cases synthseg/training_seg_17,synthseg/training_seg_18,synthseg/training_seg_19,synthseg/training_seg_20; \
    done

# Training throughput of the tiny model on this machine (and nano on a GPU if there is one).
bench-train: (env "dev")
    {{bin}}/python benchmarks/train_throughput.py

# Serve the bundled demo model and segment a real brain MRI (nilearn's MNI152) and, where ../shared is
# present, the real abdominal CT through it; writes masks, label maps, statistics and previews to demo_output/.
demo: (env "dev")
    {{bin}}/sat-demo -o {{demo_dir}}

# Orthanc, the served demo model, sat-dicom-node and the OHIF viewer: the demo CT goes into Orthanc as DICOM,
# its DICOM SEG comes back there; writes pacs_demo_output/seg_preview.png and prints the viewer's URL.
# Installs Debian's orthanc first when root.
pacs-demo *args="": (env "dev")
    #!/usr/bin/env bash
    set -euo pipefail
    if ! {{bin}}/python -c 'import sys; from satseg_clients.dicom_node.orthanc import orthanc_available as a; sys.exit(bool(a()))'; then
        [ "$(id -u)" = 0 ] && {{bin}}/python -c 'from satseg_clients.dicom_node.orthanc import install_orthanc; install_orthanc()'
    fi
    {{bin}}/python -m satseg_clients.dicom_node.demo {{args}}

# Serve a model repository on 127.0.0.1:8000 (HTTP), 8001 (gRPC), 8002 (metrics); Ctrl-C stops it.
# Exports the checkpoint into triton_repo/ first, unless that is already current.
serve checkpoint="models/demo" *args="": (env "dev")
    {{bin}}/sat-export {{checkpoint}} --if-stale
    exec {{bin}}/sat-serve {{args}}

# Serve the published SAT weights: the files downloaded into FOLDER (the SAT-Nano or SAT-Pro checkpoint, the text
# encoder's, the BioLORD-2023-C tokenizer folder; README "Serve the published SAT weights") are imported into
# checkpoints/sat-<size>, exported into triton_repo/ (unless current) and served. E.g. just serve-published downloads nano
serve-published folder size="nano" *args="": (env "dev")
    {{bin}}/sat-import --folder {{folder}} --size {{size}} -o checkpoints/sat-{{size}}
    {{bin}}/sat-export checkpoints/sat-{{size}} --if-stale
    exec {{bin}}/sat-serve {{args}}

# Runs the parity gates first: nothing is installed unless FP32 ONNX agrees with PyTorch (Dice >= 0.99).
# Fill triton_repo/ from a checkpoint (default: the bundled demo model): ONNX, FP16 ONNX, embeddings, metadata.
export checkpoint="models/demo" *args="": (env "dev")
    {{bin}}/sat-export {{checkpoint}} {{args}}

# Measure peak memory of the whole sat-segment path on a 512x512x300 CT with 32 prompts.
bench-memory: (env "dev")
    {{bin}}/python benchmarks/memory_segment.py

# Load-test the served ensemble with Locust (starts a CPU server unless --url is given); results in
# loadtest/results/<timestamp>/. E.g. just loadtest --scenario mixed --users 4 --duration 5m
loadtest *args="": (env "dev")
    {{bin}}/sat-loadtest {{args}}

# Users 1, 2, 4, 8 against each instance configuration of loadtest/sweep.toml (about 10 minutes on CPU).
loadtest-sweep *args="": (env "dev")
    {{bin}}/sat-loadtest-sweep {{args}}

# N series from M concurrent associations into a real sat-dicom-node against the served model; results in
# loadtest/results/<timestamp>-dicom-node/. E.g. just loadtest-dicom-node --series 40 --senders 8
loadtest-dicom-node *args="": (env "dev")
    {{bin}}/sat-loadtest-dicom-node {{args}}
