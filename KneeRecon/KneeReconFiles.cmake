# Every file the installed KneeRecon module needs besides its two Python files, in one place:
# KneeRecon/CMakeLists.txt builds and installs from these lists, and Testing/test_packaging.py
# runs this file through `cmake -P` to check that nothing in the source tree is left out.
# KNEERECON_SOURCE_ROOT: the repository root.

# the module's own Qt resources (installed by slicerMacroBuildScriptedModule)
set(KNEERECON_MODULE_RESOURCES
  Resources/Icons/KneeRecon.png
  Resources/UI/KneeRecon.ui
  )

# the repository's top-level Resources/: bundled models with their converted networks (OpenVINO IR,
# tied to the .pt by its SHA-256), its quality-report settings (fitted for it, also tied by SHA-256) and
# card, and the sample X-ray pair; installed to <module>/Resources/
set(KNEERECON_BUNDLED_RESOURCES
  Models/kneerecon_unet.pt
  Models/kneerecon_unet.openvino.xml
  Models/kneerecon_unet.openvino.bin
  Models/kneerecon_unet.int8.openvino.xml
  Models/kneerecon_unet.int8.openvino.bin
  Models/kneerecon_unet.quality.json
  Models/kneerecon_chen.pt
  Models/kneerecon_style.pt
  Models/kneerecon_views.npz
  Models/MODEL_CARD.md
  Sample/ap.nrrd
  Sample/lateral.nrrd
  Sample/truth.nii.gz
  Sample/meta.json
  )

# the library, every module of every subpackage (relative to the repository root)
file(GLOB_RECURSE KNEERECONLIB_SCRIPTS RELATIVE ${KNEERECON_SOURCE_ROOT} ${KNEERECON_SOURCE_ROOT}/KneeReconLib/*.py)
list(FILTER KNEERECONLIB_SCRIPTS EXCLUDE REGEX "/__pycache__/")
