package integration

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// Network namespaces for tests that need several "hosts" with addresses of
// their own (a load balancer in front of two upgraders). Every namespace
// and link is created by the test, named after the test process's pid, and
// removed in its cleanup, failed or not.

// requireNetns skips the test when this process cannot create network
// namespaces (not root, or a container that forbids it); anywhere else,
// CI included, the test runs.
func requireNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces (ip netns add)")
	}
	ip := sbin(t, "ip", "iproute2")
	name := fmt.Sprintf("upg-probe-%d", os.Getpid())
	if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("ip netns add is not permitted here: %v: %s", err, bytes.TrimSpace(out))
	}
	if out, err := exec.Command(ip, "netns", "del", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del %s: %v: %s", name, err, out)
	}
}

// sbin finds an administrator's command, in PATH or in the sbin
// directories a non-login root shell may leave out of it, and fails the
// test naming the Debian package that has it when it is missing.
func sbin(t testing.TB, name, pkg string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		if p := filepath.Join(dir, name); isExecutable(p) {
			return p
		}
	}
	t.Fatalf("%s is not installed (scripts/deps installs it: apt-get install %s)", name, pkg)
	return ""
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// ipCmd runs ip with args, failing the test with its output on error.
func ipCmd(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(sbin(t, "ip", "iproute2"), args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
}

// newNetns creates network namespace name with lo up, and removes it in
// the test's cleanup (which also deletes the veth ends inside it).
func newNetns(t testing.TB, name string) string {
	t.Helper()
	ipCmd(t, "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command(sbin(t, "ip", "iproute2"), "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	ipCmd(t, "-n", name, "link", "set", "lo", "up")
	return name
}

// link joins namespaces ns1 and ns2 with a veth pair, whose ends are named
// if1 and if2 and get the /24 addresses addr1 and addr2. The pair is
// created straight inside the namespaces, so its names never meet the
// host's interfaces.
func link(t testing.TB, ns1, if1, addr1, ns2, if2, addr2 string) {
	t.Helper()
	ipCmd(t, "link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2, "netns", ns2)
	for _, e := range []struct{ ns, ifc, addr string }{{ns1, if1, addr1}, {ns2, if2, addr2}} {
		ipCmd(t, "-n", e.ns, "addr", "add", e.addr+"/24", "dev", e.ifc)
		ipCmd(t, "-n", e.ns, "link", "set", e.ifc, "up")
	}
}

// inNetns is a command that runs bin inside namespace ns. ip netns exec
// execs bin, so the process started is bin itself and its pid is bin's.
func inNetns(t testing.TB, ns, bin string, args ...string) *exec.Cmd {
	t.Helper()
	return exec.Command(sbin(t, "ip", "iproute2"), append([]string{"netns", "exec", ns, bin}, args...)...)
}

// loadgenCmd is integration/cmd/loadgen's binary (loadgenBin).
func loadgenCmd(t testing.TB) string {
	t.Helper()
	bin, err := loadgenBin()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// nsLoad is integration/cmd/loadgen running in a namespace, with its
// progress (OK responses so far) read from its -responses lines.
type nsLoad struct {
	t    testing.TB
	cmd  *exec.Cmd
	mu   sync.Mutex
	ok   int
	res  *loadgen.Result
	junk []string
	done chan struct{}
}

// startNsLoad runs loadgen -json -responses in namespace ns against addr;
// stop (SIGINT, which loadgen takes as "finish what is in flight and
// report") ends it.
func startNsLoad(t testing.TB, ns, addr string, args ...string) *nsLoad {
	t.Helper()
	cmd := inNetns(t, ns, loadgenCmd(t), append([]string{"-json", "-responses", "-addr", addr, "-duration", "5m"}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start loadgen in %s: %v", ns, err)
	}
	l := &nsLoad{t: t, cmd: cmd, done: make(chan struct{})}
	t.Cleanup(func() {
		select {
		case <-l.done:
		default:
			syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
			<-l.done
		}
	})
	go func() {
		defer close(l.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			switch {
			case bytes.HasPrefix(line, []byte("response ")):
				l.mu.Lock()
				l.ok++
				l.mu.Unlock()
			case bytes.HasPrefix(line, []byte("{")):
				var r loadgen.Result
				if err := json.Unmarshal(line, &r); err == nil {
					l.mu.Lock()
					l.res = &r
					l.mu.Unlock()
					continue
				}
				fallthrough
			default:
				l.mu.Lock()
				l.junk = append(l.junk, string(line))
				l.mu.Unlock()
			}
		}
		io.Copy(io.Discard, out)
		cmd.Wait() // exit status 1 means failed requests: the result says which
	}()
	return l
}

// oks is the number of OK responses so far.
func (l *nsLoad) oks() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok
}

// waitOK waits until n more OK responses than at the call have come.
func (l *nsLoad) waitOK(n int) {
	l.t.Helper()
	want := l.oks() + n
	deadline := time.Now().Add(30 * time.Second)
	for l.oks() < want {
		select {
		case <-l.done:
			l.t.Fatalf("loadgen exited before %d OK responses (%d)", want, l.oks())
		default:
		}
		if time.Now().After(deadline) {
			l.t.Fatalf("loadgen got %d OK responses within 30s, want %d", l.oks(), want)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// stop ends the load and returns its result.
func (l *nsLoad) stop() loadgen.Result {
	l.t.Helper()
	syscall.Kill(l.cmd.Process.Pid, syscall.SIGINT)
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		l.t.Fatalf("loadgen pid %d did not report within 30s of SIGINT", l.cmd.Process.Pid)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.res == nil {
		l.t.Fatalf("loadgen printed no result (exit %v); other output: %q", l.cmd.ProcessState, l.junk)
	}
	return *l.res
}

// haproxy is an HAProxy process run in the foreground (-db) in a
// namespace, with its runtime API on a Unix socket in the test's temp dir.
type haproxy struct {
	t      testing.TB
	cmd    *exec.Cmd
	socket string
	mu     sync.Mutex
	log    bytes.Buffer
	done   chan struct{}
}

// startHAProxy runs haproxy -db -f cfg in namespace ns with env added to
// its environment, and returns once its runtime API answers.
func startHAProxy(t testing.TB, ns, cfg string, env ...string) *haproxy {
	t.Helper()
	h := &haproxy{t: t, socket: filepath.Join(t.TempDir(), "haproxy.sock"), done: make(chan struct{})}
	h.cmd = inNetns(t, ns, sbin(t, "haproxy", "haproxy"), "-db", "-f", cfg)
	h.cmd.Env = append(append(os.Environ(), env...), "HAPROXY_SOCKET="+h.socket)
	h.cmd.Stdout, h.cmd.Stderr = h, h
	if err := h.cmd.Start(); err != nil {
		t.Fatalf("start haproxy -f %s in %s: %v", cfg, ns, err)
	}
	go func() { h.cmd.Wait(); close(h.done) }()
	t.Cleanup(func() {
		select {
		case <-h.done:
		default:
			syscall.Kill(h.cmd.Process.Pid, syscall.SIGKILL)
			<-h.done
		}
		if t.Failed() {
			t.Logf("haproxy output:\n%s", h.output())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := h.api("show info"); err == nil {
			return h
		} else if time.Now().After(deadline) {
			t.Fatalf("haproxy's runtime API %s does not answer within 10s: %v\n%s", h.socket, err, h.output())
		}
		select {
		case <-h.done:
			t.Fatalf("haproxy -f %s exited: %v\n%s", cfg, h.cmd.ProcessState, h.output())
		default:
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// Write collects HAProxy's output (its log of abnormal requests).
func (h *haproxy) Write(b []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.log.Write(b)
}

func (h *haproxy) output() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.log.String()
}

// api sends one command to the runtime API and returns its answer.
func (h *haproxy) api(command string) (string, error) {
	c, err := net.DialTimeout("unix", h.socket, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, command+"\n"); err != nil {
		return "", fmt.Errorf("runtime API %s: %q: %w", h.socket, command, err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return "", fmt.Errorf("runtime API %s: %q: %w", h.socket, command, err)
	}
	return string(b), nil
}

// serverStat is one server's line of "show stat".
type serverStat map[string]string

func (s serverStat) n(field string) int {
	v, _ := strconv.Atoi(s[field])
	return v
}

// stats reads "show stat" for backend's servers, by server name.
func (h *haproxy) stats(backend string) (map[string]serverStat, error) {
	out, err := h.api("show stat")
	if err != nil {
		return nil, err
	}
	out = strings.TrimPrefix(out, "# ")
	rows, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil || len(rows) < 2 {
		return nil, fmt.Errorf("show stat: %q: %v", out, cmpErr(err, errors.New("no rows")))
	}
	m := map[string]serverStat{}
	for _, row := range rows[1:] {
		s := serverStat{}
		for i, k := range rows[0] {
			if i < len(row) {
				s[k] = row[i]
			}
		}
		if s["pxname"] == backend && s["svname"] != "BACKEND" {
			m[s["svname"]] = s
		}
	}
	return m, nil
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// waitServer polls "show stat" until cond holds for backend's server srv.
func (h *haproxy) waitServer(backend, srv, what string, cond func(serverStat) bool) serverStat {
	h.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last serverStat
	for {
		m, err := h.stats(backend)
		if err == nil {
			last = m[srv]
			if last != nil && cond(last) {
				return last
			}
		}
		select {
		case <-h.done:
			h.t.Fatalf("haproxy exited before server %s was %s: %v", srv, what, h.cmd.ProcessState)
		default:
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("haproxy: server %s/%s not %s within 30s (last: status %q check %q, error %v)", backend, srv, what, last["status"], last["check_status"], err)
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// isUp: fully up, not on its way down ("UP 1/2").
func isUp(s serverStat) bool { return s["status"] == "UP" }

// isDown: taken out of the pool; "DOWN 1/2" is on its way up, still out.
func isDown(s serverStat) bool { return strings.HasPrefix(s["status"], "DOWN") }
