package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

const pidFileHelper = "UPGRADER_TEST_PIDFILE_HELPER"

// TestPidFileHelperProcess is not a test: it is the same program as the
// test, alive until its stdin closes, for checkPidFile to find.
func TestPidFileHelperProcess(t *testing.T) {
	if os.Getenv(pidFileHelper) == "" {
		t.Skip("not a test: the helper process of TestCheckPidFile, run only with " + pidFileHelper + " set")
	}
	os.Stdin.Read(make([]byte, 1))
}

func TestCheckPidFile(t *testing.T) {
	dir := t.TempDir()
	write := func(content string) string {
		p := filepath.Join(dir, "upgrader.pid")
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// Ours, live: the same executable as this one.
	same := exec.Command(os.Args[0], "-test.run=^TestPidFileHelperProcess$")
	same.Env = append(os.Environ(), pidFileHelper+"=1")
	stdin, err := same.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := same.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); same.Wait() }()
	// Someone else's, live.
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	// Gone: what a SIGKILLed upgrader leaves.
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, content string
		refused       bool
	}{
		{"live upgrader", fmt.Sprintf("%d\n", same.Process.Pid), true},
		{"live other program", fmt.Sprintf("%d\n", other.Process.Pid), false},
		{"dead process", fmt.Sprintf("%d\n", gone.Process.Pid), false},
		{"our own pid", fmt.Sprintf("%d\n", os.Getpid()), false},
		{"garbage", "not a pid\n", false},
		{"empty", "", false},
	} {
		p := write(tc.content)
		err := checkPidFile(p)
		switch {
		case tc.refused && err == nil:
			t.Errorf("%s: accepted", tc.name)
		case tc.refused && !(strings.Contains(err.Error(), p) && strings.Contains(err.Error(), fmt.Sprint(same.Process.Pid)) && strings.Contains(err.Error(), "another upgrader")):
			t.Errorf("%s: %v, want the path, the pid and \"another upgrader\"", tc.name, err)
		case !tc.refused && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	if err := checkPidFile(filepath.Join(dir, "absent.pid")); err != nil {
		t.Errorf("no pid file: %v", err)
	}
}

func TestWritePidFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "upgrader.pid")
	if err := os.WriteFile(p, []byte("999999\n"), 0o644); err != nil { // left by a killed upgrader
		t.Fatal(err)
	}
	remove, err := writePidFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil || string(b) != fmt.Sprintf("%d\n", os.Getpid()) {
		t.Fatalf("pid file holds %q, %v", b, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("temporary files left next to the pid file: %v", ents)
	}
	remove()
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Fatalf("our pid file is still there after remove: %v", err)
	}

	// Another upgrader took the path over: its file stays.
	remove, err = writePidFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte("12345\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	remove()
	if b, err := os.ReadFile(p); err != nil || string(b) != "12345\n" {
		t.Fatalf("remove deleted a pid file that is not ours: %q %v", b, err)
	}

	if _, err := writePidFile(filepath.Join(dir, "no", "such", "dir.pid")); err == nil || !strings.Contains(err.Error(), "--pid-file") {
		t.Fatalf("unwritable pid file: %v", err)
	}
}

// A pid file left by a killed upgrader may name a pid reused by another
// program, which USR2 would kill.
func TestUpgradeByPidFileSignalsOnlyAnUpgrader(t *testing.T) {
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- other.Wait() }()
	defer func() { other.Process.Kill(); <-exited }()
	p := filepath.Join(t.TempDir(), "upgrader.pid")
	if err := os.WriteFile(p, fmt.Appendf(nil, "%d\n", other.Process.Pid), 0o644); err != nil {
		t.Fatal(err)
	}
	err := signalPidFile(p)
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "not an upgrader") {
		t.Fatalf("signalPidFile on another program's pid: %v", err)
	}
	// Still running: a USR2 would have ended it. Kill(0) only checks.
	if err := other.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("sleep is gone: %v", err)
	}
	select {
	case err := <-exited:
		exited <- err
		t.Fatalf("sleep exited: %v", err)
	default:
	}
}
