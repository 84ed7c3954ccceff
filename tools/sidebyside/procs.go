package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// becomeSubreaper makes this process the reaper of its orphaned
// descendants: nginx's and tableflip's new processes are children of the
// old ones, and without it they would go to init when the old ones exit,
// out of reach of the clean-up.
func becomeSubreaper() error {
	const prSetChildSubreaper = 36
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", errno)
	}
	return nil
}

// child is one process this tool started.
type child struct {
	cmd  *exec.Cmd
	log  string // its stdout and stderr
	done chan struct{}
	err  error
}

// startChild runs name with args in dir, its output to logName in dir.
func startChild(dir, logName string, env []string, name string, args ...string) (*child, error) {
	f, err := os.Create(filepath.Join(dir, logName))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(name, args...)
	cmd.Dir, cmd.Stdout, cmd.Stderr = dir, f, f
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c := &child{cmd: cmd, log: f.Name(), done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// exited reports whether the child has exited, waiting up to d for it.
func (c *child) exited(d time.Duration) bool {
	select {
	case <-c.done:
		return true
	case <-time.After(d):
		return false
	}
}

// stop sends sig, and SIGKILL if the child is still there after grace.
// Through os.Process (a pidfd), so that a child already reaped is never
// confused with a new process that got its pid.
func (c *child) stop(sig syscall.Signal, grace time.Duration) {
	if c.exited(0) {
		return
	}
	c.cmd.Process.Signal(sig)
	if !c.exited(grace) {
		c.cmd.Process.Kill()
		<-c.done
	}
}

// signal sends sig to the child unless it has exited.
func (c *child) signal(sig syscall.Signal) error {
	return c.cmd.Process.Signal(sig)
}

// tail returns the last n lines of the child's log, for error messages.
func (c *child) tail(n int) string {
	b, _ := os.ReadFile(c.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// killOrphans kills and reaps every child of this process left once a
// system has been stopped: as the subreaper, its only children are the
// processes it started and their orphaned descendants.
func killOrphans() {
	for range 50 {
		pids := childrenOf(os.Getpid())
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		for _, pid := range pids {
			var ws syscall.WaitStatus
			syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// childrenOf lists the pids whose parent is ppid, from /proc.
func childrenOf(ppid int) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, _, ok := procStat(pid); ok && p == ppid {
			pids = append(pids, pid)
		}
	}
	return pids
}

// procStat returns the parent and state of pid from /proc/PID/stat.
func procStat(pid int) (ppid int, state byte, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, false
	}
	// The command name is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(f[1])
	return ppid, f[0][0], err == nil
}

// gone reports whether pid has exited; a zombie counts as exited, and is
// reaped when it is this process's child (an orphan it adopted).
func gone(pid int) bool {
	ppid, state, ok := procStat(pid)
	if !ok {
		return true
	}
	if state != 'Z' {
		return false
	}
	if ppid == os.Getpid() {
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
	}
	return true
}

// waitFor polls cond every 5 ms until it holds or d has passed.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// readPid reads a pid file; 0 when it is missing or not a number yet.
func readPid(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// freePort returns a loopback port that was free a moment ago, for the
// servers that cannot bind port 0 and say which port they got (nginx,
// HAProxy, bareflip).
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// probe sends one POST like loadgen's and reports whether it got a 200.
func probe(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\nContent-Length: 16\r\nConnection: close\r\n\r\n0123456789abcdef", addr)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "HTTP/1.1 200 ") {
		return fmt.Errorf("answered %q", strings.TrimSpace(line))
	}
	return nil
}

// waitServing waits until addr answers a POST with 200.
func waitServing(addr string, d time.Duration) error {
	var err error
	if waitFor(d, func() bool { err = probe(addr); return err == nil }) {
		return nil
	}
	return fmt.Errorf("%s did not answer a POST with 200 within %s: %w", addr, d, err)
}
