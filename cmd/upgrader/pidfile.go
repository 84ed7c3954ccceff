package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// checkPidFile refuses a pid file that names another upgrader still
// running: overwriting it would point `kill -USR2 $(cat PIDFILE)` at us and
// leave that one unreachable. A file left by a killed upgrader, or naming a
// pid reused by some other program, is fine to overwrite.
func checkPidFile(path string) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("--pid-file %s: %w", path, err)
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil || pid <= 0 || pid == os.Getpid() {
		return nil
	}
	if err := unix.Kill(pid, 0); err != nil && !errors.Is(err, unix.EPERM) {
		return nil // gone
	}
	if !isUpgrader(pid) {
		return nil
	}
	return fmt.Errorf("--pid-file %s: another upgrader (pid %d) is running with this pid file; stop it, or give this one its own --pid-file (and --control)", path, pid)
}

// isUpgrader reports whether process pid runs this program: the same
// executable file, or, when that cannot be told (the binary was replaced on
// disk by an upgrade since, or /proc/PID/exe is another user's), an
// executable or argv[0] of the same name.
func isUpgrader(pid int) bool {
	proc := fmt.Sprintf("/proc/%d", pid)
	self, serr := os.Stat("/proc/self/exe")
	other, oerr := os.Stat(proc + "/exe")
	if serr == nil && oerr == nil && os.SameFile(self, other) {
		return true
	}
	selfExe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return false
	}
	name := filepath.Base(strings.TrimSuffix(selfExe, " (deleted)"))
	if exe, err := os.Readlink(proc + "/exe"); err == nil {
		return filepath.Base(strings.TrimSuffix(exe, " (deleted)")) == name
	}
	cmdline, err := os.ReadFile(proc + "/cmdline")
	if err != nil {
		return false
	}
	argv0, _, _ := bytes.Cut(cmdline, []byte{0})
	return filepath.Base(string(argv0)) == name
}

// writePidFile writes our pid to path through a temporary file and a
// rename, so that a reader never sees a half-written pid. The returned
// remove deletes the file only while it still holds our pid: another
// upgrader may have taken the path over since (after ours was stuck or
// its file was deleted by hand).
func writePidFile(path string) (remove func(), err error) {
	content := fmt.Appendf(nil, "%d\n", os.Getpid())
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return nil, fmt.Errorf("--pid-file %s: %w", path, err)
	}
	_, werr := tmp.Write(content)
	if err := errors.Join(werr, tmp.Chmod(0o644), tmp.Close()); err != nil {
		os.Remove(tmp.Name())
		return nil, fmt.Errorf("--pid-file %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return nil, fmt.Errorf("--pid-file %s: %w", path, err)
	}
	return func() {
		if b, err := os.ReadFile(path); err == nil && bytes.Equal(b, content) {
			os.Remove(path)
		}
	}, nil
}
