#!/usr/bin/env bash
# Regenerates assets/fonts/DejaVuSans-subset.ttf, the font `fisher-stein report` draws plot text
# with (plotters' ab_glyph backend needs the font bytes; no system font lookup at run time).
#
# Source: DejaVuSans.ttf 2.37 from Debian's fonts-dejavu-core (Bitstream Vera / public-domain
# licence, copied to assets/fonts/LICENSE-DejaVu). Subset with fontTools 4.60.1 to Basic Latin,
# Latin-1, Greek and the punctuation / math symbols the plots use.
#
#   python3 -m venv /tmp/ftvenv && /tmp/ftvenv/bin/pip install fonttools==4.60.1
#   PYFTSUBSET=/tmp/ftvenv/bin/pyftsubset tools/subset_font.sh
set -euo pipefail
cd "$(dirname "$0")/.."
src=${DEJAVU_TTF:-/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf}
"${PYFTSUBSET:-pyftsubset}" "$src" \
  --unicodes="U+0020-007E,U+00A0-00FF,U+0370-03FF,U+2010-2027,U+2030-203A,U+2070-209F,U+2190-2199,U+2200-22FF" \
  --layout-features='' --no-hinting --desubroutinize --drop-tables+=FFTM,GDEF,GPOS,GSUB \
  --output-file=assets/fonts/DejaVuSans-subset.ttf
cp /usr/share/doc/fonts-dejavu-core/copyright assets/fonts/LICENSE-DejaVu
sha256sum assets/fonts/DejaVuSans-subset.ttf
