# One run per --exp-dir, sourced by the recipes once $exp_dir exists: flock on $exp_dir/.pahubert.lock, held
# by the sourcing shell and its children (file descriptor 9) until they exit; the holder's PID is written
# into the lock file so a second run can say whom it waits for. (The fine-tuning task takes the same lock
# on its save_dir in Python: pahubert_plugin/training.py.)
lock_file=$exp_dir/.pahubert.lock
exec 9>>"$lock_file"
if ! command -v flock >/dev/null; then
  echo "run.sh: warning: no flock command (util-linux): $exp_dir is not locked against a second run" >&2
elif ! flock -n 9; then
  echo "run.sh: $exp_dir is in use by another run (PID $(cat "$lock_file" 2>/dev/null || echo unknown)," \
       "holding $lock_file); wait for it to finish, or give another --exp-dir" >&2
  exit 1
fi
echo $$ > "$lock_file"
