# Kaldi-style option parsing, sourced by the recipes after their variables are declared:
#   --name-with-dashes VALUE sets the variable name_with_dashes (it must already exist);
#   -h/--help calls the recipe's usage function; everything after `--` lands in train_overrides
#   (hydra overrides passed through to fairseq-hydra-train).
options_help() {  # SCRIPT: its option block (from "# ---- options" to PYTHON=) as --name default  comment
  awk '/^# ---- options/ { on = 1; print "Options (default):"; next } /^PYTHON=/ { exit } !on { next }
    /^[a-z0-9_]+=/ { eq = index($0, "="); name = substr($0, 1, eq - 1); gsub(/_/, "-", name)
      rest = substr($0, eq + 1); c = index(rest, "#"); value = c ? substr(rest, 1, c - 1) : rest
      note = c ? substr(rest, c + 1) : ""; sub(/ +$/, "", value); sub(/^ +/, "", note)
      line = sprintf("  --%-18s %-16s %s", name, value == "" ? "(none)" : value, note); sub(/ +$/, "", line)
      print line; next }
    /^ +#/ { sub(/^ +# ?/, ""); printf "  %-38s%s\n", "", $0; next }
    /^#/ { sub(/^# ?/, ""); print }' "$1"
}
train_overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --) shift; train_overrides=("$@"); break ;;
    --*)
      name=${1#--}; name=${name//-/_}
      [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }
      if ! declare -p "$name" >/dev/null 2>&1 || [ "$name" = name ]; then
        echo "$0: unknown option $1 (see --help)" >&2; exit 1
      fi
      printf -v "$name" '%s' "$2"; shift 2 ;;
    *) echo "$0: unexpected argument $1 (see --help)" >&2; exit 1 ;;
  esac
done
