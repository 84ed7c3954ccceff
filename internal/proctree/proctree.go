// Package proctree reads the process table from /proc (proc(5)) so that a
// supervisor can find every descendant of the processes it started, even
// those that left their process group or session, or were reparented to it
// as a subreaper (PR_SET_CHILD_SUBREAPER, prctl(2)).
package proctree

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Proc is one process as /proc/PID/stat shows it.
type Proc struct {
	Pid, PPid, Pgid, Sid int
	// State is stat's one-letter state: R, S, D, Z (zombie), T, …
	State byte
	// StartTicks is when it started, in clock ticks since boot (stat's
	// field 22; 0 when the line is cut short); Started is that time on the
	// wall clock, as Read computes it (zero from ParseStat alone).
	StartTicks uint64
	Started    time.Time
}

// clockTick is the unit of stat's times: USER_HZ, 100 on every Linux ABI.
const clockTick = 10 * time.Millisecond

// Table is a snapshot of every process visible in /proc, by pid.
type Table map[int]Proc

// Read takes a snapshot from root (normally "/proc"). Processes that exit
// while it reads are left out; the error is non-nil only when root cannot
// be listed.
func Read(root string) (Table, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("process table %s: %w", root, err)
	}
	t := make(Table, len(ents))
	// stat counts from boot, suspend included: CLOCK_BOOTTIME's epoch.
	var boot time.Time
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) == nil {
		boot = time.Now().Add(-time.Duration(ts.Nano()))
	}
	buf := make([]byte, 0, 512)
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := readFile(root+"/"+e.Name()+"/stat", buf)
		if err != nil {
			continue // gone
		}
		buf = b
		if p, err := ParseStat(b); err == nil && p.Pid == pid {
			if !boot.IsZero() && p.StartTicks > 0 {
				p.Started = boot.Add(time.Duration(p.StartTicks) * clockTick)
			}
			t[pid] = p
		}
	}
	return t, nil
}

// ParseStat parses the start of a /proc/PID/stat line: "pid (comm) state
// ppid pgrp session …". comm may hold spaces and parentheses, so it is cut
// at the last ')'.
func ParseStat(b []byte) (Proc, error) {
	open := bytes.IndexByte(b, '(')
	end := bytes.LastIndexByte(b, ')')
	if open < 1 || end < open || end+2 > len(b) {
		return Proc{}, fmt.Errorf("proc stat %.60q: no (comm)", b)
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b[:open])))
	if err != nil {
		return Proc{}, fmt.Errorf("proc stat %.60q: pid: %w", b, err)
	}
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 4 || len(f[0]) != 1 {
		return Proc{}, fmt.Errorf("proc stat %.60q: too few fields", b)
	}
	p := Proc{Pid: pid, State: f[0][0]}
	for i, dst := range []*int{&p.PPid, &p.Pgid, &p.Sid} {
		if *dst, err = strconv.Atoi(f[1+i]); err != nil {
			return Proc{}, fmt.Errorf("proc stat %.60q: field %d: %w", b, 4+i, err)
		}
	}
	if len(f) > 19 {
		if p.StartTicks, err = strconv.ParseUint(f[19], 10, 64); err != nil {
			return Proc{}, fmt.Errorf("proc stat %.60q: field 22: %w", b, err)
		}
	}
	return p, nil
}

// ChildrenOfThreads returns the children of pid's threads tids, from
// root/PID/task/TID/children, as ChildrenOf does for every thread: where
// the caller knows which of its threads can have children, a file or two
// instead of one per thread. A tid listed twice is read once.
func ChildrenOfThreads(root string, pid int, tids []int) ([]int, error) {
	var out []int
	buf := make([]byte, 0, 128)
	for i, tid := range tids {
		if slices.Contains(tids[:i], tid) {
			continue
		}
		b, err := readFile(fmt.Sprintf("%s/%d/task/%d/children", root, pid, tid), buf)
		if err != nil {
			return nil, fmt.Errorf("children of %d thread %d: %w", pid, tid, err)
		}
		buf = b
		out = appendPids(out, b)
	}
	return out, nil
}

// appendPids appends the pids of a children file, space-separated.
func appendPids(out []int, b []byte) []int {
	for _, f := range strings.Fields(string(b)) {
		if c, err := strconv.Atoi(f); err == nil {
			out = append(out, c)
		}
	}
	return out
}

// ChildrenOf returns the children of pid from root/PID/task/*/children
// (proc(5), Linux 3.5 with CONFIG_PROC_CHILDREN), zombies included: a
// few small files, where Read lists every process. The error says the
// files cannot be read (a kernel without them), not that there are none.
func ChildrenOf(root string, pid int) ([]int, error) {
	dir := fmt.Sprintf("%s/%d/task", root, pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("children of %d: %w", pid, err)
	}
	var out []int
	buf := make([]byte, 0, 128)
	for _, t := range tasks {
		b, err := readFile(dir+"/"+t.Name()+"/children", buf)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && t.Name() != strconv.Itoa(pid) {
				continue // a thread that has just ended
			}
			return nil, fmt.Errorf("children of %d: %w", pid, err)
		}
		buf = b
		out = appendPids(out, b)
	}
	return out, nil
}

// Children maps each pid to its live (not zombie) children.
func (t Table) Children() map[int][]int {
	out := make(map[int][]int, len(t))
	for _, p := range t {
		if p.State != 'Z' {
			out[p.PPid] = append(out[p.PPid], p.Pid)
		}
	}
	return out
}

// Descendants returns every live process below root (root excluded).
func (t Table) Descendants(root int) []int {
	return t.Below(t.Children(), root)
}

// Below walks kids from root and returns every pid below it, root excluded.
func (t Table) Below(kids map[int][]int, root int) []int {
	var out []int
	stack := append([]int(nil), kids[root]...)
	for len(stack) > 0 {
		pid := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		out = append(out, pid)
		stack = append(stack, kids[pid]...)
	}
	return out
}

// Environ reads a process's initial environment (/proc/PID/environ) as
// KEY → value; nil when it cannot be read (gone, or not ours to read).
func Environ(root string, pid int) map[string]string {
	b, err := os.ReadFile(fmt.Sprintf("%s/%d/environ", root, pid))
	if err != nil {
		return nil
	}
	env := map[string]string{}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			env[k] = v
		}
	}
	return env
}
