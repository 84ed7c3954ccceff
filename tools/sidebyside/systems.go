package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// env is what a system needs to start: the binaries this tool built, the
// repository (for scripts), and a temp dir of its own for this run.
type env struct {
	bin  string // dir holding upgrader, hello and bareflip
	repo string
	dir  string
	// upgraderFlags are added to every upgrader command line
	// (Options.UpgraderFlags).
	upgraderFlags []string
}

// server is one running system under test.
type server interface {
	addr() string
	// reload does one zero-downtime reload the way the system's docs
	// describe it; it returns once the reload has been asked for (and,
	// where the procedure has steps, once they are done).
	reload() error
	// stop ends every process of the system.
	stop()
	// reloadsDone counts the reloads that took effect, from what the
	// system says (its logs) or from the generations that answered res.
	reloadsDone(res loadgen.Result) int
}

// fromGenerations is reloadsDone for the servers that name their
// generation in X-Generation: the newest that answered, less the first.
func fromGenerations(res loadgen.Result) int {
	newest := 0
	for g := range res.Generations {
		if n, err := strconv.Atoi(g); err == nil {
			newest = max(newest, n)
		}
	}
	return max(0, newest-1)
}

// countLines counts substr in the file at path: in the logs it reads,
// each message it looks for is one line.
func countLines(path, substr string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), substr)
}

// system is one competitor.
type system struct {
	name   string // short name, used by -systems
	title  string // how the table and the picture name it
	reload string // how it is reloaded, for the table
	// needs lists the executables it needs besides this tool's builds.
	needs []string
	start func(e env) (server, error)
}

var systems = []system{
	{name: "upgrader", title: "upgrader", reload: "USR2 to upgrader", start: startUpgrader},
	{name: "nginx-hup", title: "nginx, reload", reload: "HUP to the master", needs: []string{"nginx"}, start: startNginxHUP},
	{name: "nginx-binary", title: "nginx, binary upgrade", reload: "USR2, then QUIT to the old master", needs: []string{"nginx"}, start: startNginxBinary},
	{name: "haproxy", title: "HAProxy", reload: "USR2 to the master", needs: []string{"haproxy"}, start: startHAProxy},
	{name: "bareflip", title: "tableflip (bare)", reload: "USR2 (tableflip Upgrade)", start: startBareflip},
	{name: "node-cluster", title: "Node.js cluster", reload: "USR2: rolling restart", needs: []string{"node"}, start: startNodeCluster},
	{name: "upgrader-node", title: "upgrader + Node.js (module)", reload: "USR2 to upgrader", needs: []string{"node"}, start: startUpgraderNode},
	{name: "upgrader-plain", title: "upgrader + unchanged Go server", reload: "USR2 to upgrader", start: startUpgraderPlain},
}

func systemNamed(name string) (system, bool) {
	for _, s := range systems {
		if s.name == name {
			return s, true
		}
	}
	return system{}, false
}

// missing returns the executables s needs that are not installed.
func (s system) missing() []string {
	var m []string
	for _, n := range s.needs {
		if _, err := exec.LookPath(n); err != nil {
			m = append(m, n)
		}
	}
	return m
}

// ---- upgrader ----

type upgraderServer struct {
	c       *child
	address string
}

// startUpgrader runs upgrader supervising examples/hello on a port it
// picks itself (127.0.0.1:0), live-connection handoff on as by default,
// and reads the port from `upgrader status --json`.
func startUpgrader(e env) (server, error) {
	return startUpgraderWith(e, nil, filepath.Join(e.bin, "hello"))
}

// startUpgraderNode runs upgrader with Node's IPC channel (--ipc node)
// supervising examples/node/server.js, which drains with the nodejs/
// module; as many workers per generation as the Node.js cluster runs (one
// per CPU), so that both spread the load over the same processes.
func startUpgraderNode(e env) (server, error) {
	return startUpgraderWith(e, []string{"--ipc", "node", "-w", strconv.Itoa(nodeWorkers())},
		"node", filepath.Join(e.repo, "examples", "node", "server.js"))
}

// startUpgraderPlain runs upgrader supervising integration/cmd/plainhttp,
// the Go server of bareflip's row without tableflip: net/http on the
// inherited fd 3, READY=1 through go-systemd, http.Server.Shutdown on
// SIGTERM, no drain package (docs/unchanged-servers.md).
func startUpgraderPlain(e env) (server, error) {
	return startUpgraderWith(e, nil, filepath.Join(e.bin, "plainhttp"))
}

// startUpgraderWith runs upgrader with flags added to the common ones,
// supervising the worker command.
func startUpgraderWith(e env, flags []string, command ...string) (server, error) {
	control := filepath.Join(e.dir, "control.sock")
	// --ready-hold 0: with the default hold (500 ms: the new generation
	// must stay ready that long before the old one drains, a safety no
	// other system here has) reloads asked 0.5 s apart fold into each
	// other, and the rows would compare fewer reloads.
	argv := append([]string{"run", "--log-level", "warn", "--control", control, "-l", "127.0.0.1:0", "--ready-hold", "0"}, e.upgraderFlags...)
	argv = append(argv, flags...)
	argv = append(append(argv, "--"), command...)
	c, err := startChild(e.dir, "upgrader.log", nil, filepath.Join(e.bin, "upgrader"), argv...)
	if err != nil {
		return nil, err
	}
	s := &upgraderServer{c: c}
	var lastErr error
	ok := waitFor(10*time.Second, func() bool {
		out, err := exec.Command(filepath.Join(e.bin, "upgrader"), "status", "--control", control, "--json").Output()
		if err != nil {
			lastErr = err
			return false
		}
		var st struct {
			Listeners []struct{ Address string } `json:"listeners"`
		}
		if err := json.Unmarshal(out, &st); err != nil || len(st.Listeners) == 0 {
			lastErr = fmt.Errorf("status %q: no listener (%v)", out, err)
			return false
		}
		s.address = st.Listeners[0].Address
		return true
	})
	if !ok {
		c.stop(syscall.SIGKILL, time.Second)
		return nil, fmt.Errorf("upgrader status on %s: %v\n%s", control, lastErr, c.tail(20))
	}
	return s, nil
}

func (s *upgraderServer) addr() string  { return s.address }
func (s *upgraderServer) reload() error { return s.c.signal(syscall.SIGUSR2) }
func (s *upgraderServer) stop()         { s.c.stop(syscall.SIGTERM, 10*time.Second) }

func (s *upgraderServer) reloadsDone(res loadgen.Result) int { return fromGenerations(res) }

// ---- nginx ----

// nginxConf is nginx's configuration for both nginx systems: the response
// comes from nginx itself (return 200), every path nginx writes is in the
// run's temp dir, and nothing else is changed from nginx's defaults
// (keepalive_timeout 75s, keepalive_requests 1000).
func nginxConf(dir string, port int, daemon bool) string {
	d := "off"
	if daemon {
		d = "on"
	}
	return fmt.Sprintf(`daemon %s;
master_process on;
worker_processes auto;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log notice;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %[2]s/client_body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    server {
        listen 127.0.0.1:%[3]d;
        location / {
            default_type text/plain;
            return 200 "hello from nginx\n";
        }
    }
}
`, d, dir, port)
}

type nginxServer struct {
	e       env
	c       *child // the master (nginx-hup), or the command that daemonized (nginx-binary)
	address string
	pidFile string
}

func startNginx(e env, daemon bool) (*nginxServer, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	conf := filepath.Join(e.dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(nginxConf(e.dir, port, daemon)), 0o644); err != nil {
		return nil, err
	}
	// nginx's binary upgrade executes its own argv[0] again: give it the
	// full path.
	path, err := exec.LookPath("nginx")
	if err != nil {
		return nil, err
	}
	c, err := startChild(e.dir, "nginx.out", nil, path, "-p", e.dir, "-c", conf, "-e", filepath.Join(e.dir, "error.log"))
	if err != nil {
		return nil, err
	}
	s := &nginxServer{e: e, c: c, address: fmt.Sprintf("127.0.0.1:%d", port), pidFile: filepath.Join(e.dir, "nginx.pid")}
	if !waitFor(10*time.Second, func() bool { return readPid(s.pidFile) != 0 }) {
		s.stop()
		return nil, fmt.Errorf("nginx wrote no pid file %s: %s", s.pidFile, s.errorLog())
	}
	return s, nil
}

func (s *nginxServer) errorLog() string {
	b, _ := os.ReadFile(filepath.Join(s.e.dir, "error.log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-10):], "\n")
}

func (s *nginxServer) addr() string { return s.address }

// stop asks the current master for a graceful stop (QUIT), then kills
// what is left; killOrphans takes the masters this tool adopted.
func (s *nginxServer) stop() {
	if pid := readPid(s.pidFile); pid != 0 {
		syscall.Kill(pid, syscall.SIGQUIT)
		if !waitFor(10*time.Second, func() bool { return gone(pid) }) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	s.c.stop(syscall.SIGKILL, time.Second)
}

type nginxHUP struct{ *nginxServer }

// startNginxHUP runs nginx in the foreground (daemon off), its master this
// tool's child.
func startNginxHUP(e env) (server, error) {
	s, err := startNginx(e, false)
	if err != nil {
		return nil, err
	}
	return nginxHUP{s}, nil
}

// reload is nginx's configuration reload: HUP to the master, which starts
// new workers and asks the old ones to shut down gracefully.
func (s nginxHUP) reload() error { return s.c.signal(syscall.SIGHUP) }

// reloadsDone counts the HUPs the master logged (at notice level).
func (s nginxHUP) reloadsDone(loadgen.Result) int {
	return countLines(filepath.Join(s.e.dir, "error.log"), "(SIGHUP) received")
}

type nginxBinary struct{ *nginxServer }

// startNginxBinary runs nginx as a daemon (daemon on): nginx ignores the
// binary-upgrade signal in a master whose parent is the process that
// started it ("the changing binary signal is ignored"), which is this tool
// under "daemon off". Daemonized, the master is adopted by this tool, the
// subreaper.
func startNginxBinary(e env) (server, error) {
	s, err := startNginx(e, true)
	if err != nil {
		return nil, err
	}
	return nginxBinary{s}, nil
}

// reload upgrades nginx's executable on the fly as its documentation
// describes it: USR2 to the master, which renames its pid file to
// nginx.pid.oldbin and starts a new master (and its workers) from the
// executable; once the new master and its workers run, QUIT to the old
// master, which shuts its workers down gracefully and exits. It waits
// for the old master to exit, since a new master ignores USR2 while its
// parent, the old master, lives.
func (s nginxBinary) reload() error {
	old := readPid(s.pidFile)
	if old == 0 {
		return fmt.Errorf("no master pid in %s", s.pidFile)
	}
	if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
		return fmt.Errorf("USR2 to master %d: %w", old, err)
	}
	var next int
	if !waitFor(5*time.Second, func() bool {
		next = readPid(s.pidFile)
		return next != 0 && next != old && len(childrenOf(next)) >= nginxWorkers()
	}) {
		return fmt.Errorf("no new master with its workers 5s after USR2 to %d: %s", old, s.errorLog())
	}
	if err := syscall.Kill(old, syscall.SIGQUIT); err != nil {
		return fmt.Errorf("QUIT to old master %d: %w", old, err)
	}
	if !waitFor(10*time.Second, func() bool { return gone(old) }) {
		return fmt.Errorf("old master %d still running 10s after QUIT", old)
	}
	return nil
}

// reloadsDone counts the new masters the old ones logged starting.
func (s nginxBinary) reloadsDone(loadgen.Result) int {
	return countLines(filepath.Join(s.e.dir, "error.log"), "start new binary process")
}

// nodeWorkers is what cluster.js starts: os.availableParallelism(), one
// per CPU this process may run on.
func nodeWorkers() int { return max(1, runtime.NumCPU()) }

// nginxWorkers is what worker_processes auto starts: one per CPU.
func nginxWorkers() int {
	n := 0
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "processor") {
			n++
		}
	}
	return max(1, n)
}

// ---- HAProxy ----

// haproxyConf serves the response from HAProxy itself (http-request
// return), configured for seamless reloads as HAProxy 2.6's management
// guide recommends: master-worker mode, where the master passes the
// listening sockets to the new worker itself (-x sockpair@, so no stats
// socket with expose-fd listeners is needed; one is declared all the
// same, as the guide's examples for older setups do), and "option
// idle-close-on-response", so that an old worker keeps its idle keep-alive
// connections and closes each after answering its next request instead of
// closing them under clients at the reload.
func haproxyConf(dir string, port int) string {
	return fmt.Sprintf(`global
    master-worker
    stats socket %[1]s/admin.sock mode 600 level admin expose-fd listeners
    hard-stop-after 30s

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    option idle-close-on-response

frontend hello
    bind 127.0.0.1:%[2]d
    http-request return status 200 content-type text/plain string "hello from haproxy\n"
`, dir, port)
}

type haproxyServer struct {
	c       *child
	address string
}

// startHAProxy runs HAProxy in master-worker mode in the foreground
// (-W -db), the master this tool's child.
func startHAProxy(e env) (server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	conf := filepath.Join(e.dir, "haproxy.cfg")
	if err := os.WriteFile(conf, []byte(haproxyConf(e.dir, port)), 0o644); err != nil {
		return nil, err
	}
	c, err := startChild(e.dir, "haproxy.log", nil, "haproxy", "-W", "-db", "-f", conf)
	if err != nil {
		return nil, err
	}
	return &haproxyServer{c: c, address: fmt.Sprintf("127.0.0.1:%d", port)}, nil
}

func (s *haproxyServer) addr() string  { return s.address }
func (s *haproxyServer) reload() error { return s.c.signal(syscall.SIGUSR2) }

// reloadsDone counts the workers the master logged forking, less the
// first.
func (s *haproxyServer) reloadsDone(loadgen.Result) int {
	return max(0, countLines(s.c.log, "New worker (")-1)
}

// stop is HAProxy's soft stop (USR1 to the master), then a kill.
func (s *haproxyServer) stop() { s.c.stop(syscall.SIGUSR1, 10*time.Second) }

// ---- bare tableflip ----

type bareflipServer struct {
	c       *child
	address string
	pidFile string
}

// startBareflip runs integration/cmd/bareflip, a tableflip server written
// as tableflip's documentation shows; every upgrade forks a new process
// that this tool adopts once its parent exits.
func startBareflip(e env) (server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &bareflipServer{address: fmt.Sprintf("127.0.0.1:%d", port), pidFile: filepath.Join(e.dir, "bareflip.pid")}
	s.c, err = startChild(e.dir, "bareflip.log", nil, filepath.Join(e.bin, "bareflip"), "-addr", s.address, "-pid-file", s.pidFile)
	if err != nil {
		return nil, err
	}
	if !waitFor(10*time.Second, func() bool { return readPid(s.pidFile) != 0 }) {
		s.stop()
		return nil, fmt.Errorf("bareflip wrote no pid file %s:\n%s", s.pidFile, s.c.tail(10))
	}
	return s, nil
}

func (s *bareflipServer) addr() string { return s.address }

// reload signals the process serving now (tableflip writes its pid file
// when it is ready).
func (s *bareflipServer) reload() error {
	pid := readPid(s.pidFile)
	if pid == 0 {
		return fmt.Errorf("no pid in %s", s.pidFile)
	}
	return syscall.Kill(pid, syscall.SIGUSR2)
}

func (s *bareflipServer) reloadsDone(res loadgen.Result) int { return fromGenerations(res) }

func (s *bareflipServer) stop() {
	if pid := readPid(s.pidFile); pid != 0 {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	s.c.stop(syscall.SIGTERM, 5*time.Second)
}

// ---- Node.js cluster ----

type nodeServer struct {
	c       *child
	address string
}

// startNodeCluster runs tools/sidebyside/cluster.js: a cluster primary
// with one worker per CPU, its workers listening on port 0 (the primary
// holds the one socket and picks the port, which it writes to a file).
func startNodeCluster(e env) (server, error) {
	portFile := filepath.Join(e.dir, "port")
	c, err := startChild(e.dir, "node.log", []string{"PORT_FILE=" + portFile}, "node",
		filepath.Join(e.repo, "tools", "sidebyside", "cluster.js"))
	if err != nil {
		return nil, err
	}
	s := &nodeServer{c: c}
	if !waitFor(10*time.Second, func() bool { return readPid(portFile) != 0 }) {
		s.stop()
		return nil, fmt.Errorf("node cluster wrote no port to %s:\n%s", portFile, c.tail(10))
	}
	s.address = "127.0.0.1:" + strconv.Itoa(readPid(portFile))
	return s, nil
}

func (s *nodeServer) addr() string  { return s.address }
func (s *nodeServer) reload() error { return s.c.signal(syscall.SIGUSR2) }
func (s *nodeServer) stop()         { s.c.stop(syscall.SIGTERM, 10*time.Second) }

// reloadsDone counts the restarts whose workers answered; a USR2 that came
// during a restart was folded into the one restart queued after it.
func (s *nodeServer) reloadsDone(res loadgen.Result) int { return fromGenerations(res) }
