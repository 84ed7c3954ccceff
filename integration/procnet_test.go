package integration

import (
	"bufio"
	"encoding/binary"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// What the kernel says about TCP sockets (/proc/net/tcp and tcp6): tests
// wait on this state, not on time, for "a worker has accepted and read this
// connection" or "a worker no longer accepts".

// tcpListeners lists the listening TCP sockets. The kernel lists them
// before the connected ones (of which a load test leaves tens of thousands
// in TIME_WAIT), so reading stops at the first of those.
func tcpListeners() map[string]string {
	out := map[string]string{} // inode → address
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		file, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(file)
		sc.Scan() // the header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || fs[3] != proctree.TCPListen {
				break
			}
			out[fs[9]] = proctree.TCPAddr(fs[1])
		}
		file.Close()
	}
	return out
}

// socketInodes maps the socket inodes pid holds to their fd numbers.
func socketInodes(pid int) map[string]int { return proctree.SocketInodes("/proc", pid) }

// listeningAddrs lists the addresses of the listening TCP sockets pid
// holds.
func listeningAddrs(pid int) []string {
	held := socketInodes(pid)
	var out []string
	for in, a := range tcpListeners() {
		if _, ok := held[in]; ok {
			out = append(out, a)
		}
	}
	return out
}

// listenerAt returns the address of the listening TCP socket at fd in pid,
// or "" if there is none (yet).
func listenerAt(pid, fd int) string {
	for in, f := range socketInodes(pid) {
		if f == fd {
			return tcpListeners()[in]
		}
	}
	return ""
}

// consumedBy reports whether pid holds the server end of c and has read
// every byte that arrived on it.
func consumedBy(c net.Conn, pid int) bool {
	rq, inode, ok := diagTCP(c.RemoteAddr().(*net.TCPAddr), c.LocalAddr().(*net.TCPAddr))
	if !ok || rq != 0 {
		return false
	}
	_, held := socketInodes(pid)[strconv.FormatUint(uint64(inode), 10)]
	return held
}

// diagTCP looks up the TCP socket local→remote with sock_diag (an exact
// lookup: no dump of every socket) and returns its receive queue and inode.
func diagTCP(local, remote *net.TCPAddr) (rqueue, inode uint32, ok bool) {
	l4, r4 := local.IP.To4(), remote.IP.To4()
	if l4 == nil || r4 == nil {
		return 0, 0, false
	}
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 4 /* NETLINK_SOCK_DIAG */)
	if err != nil {
		return 0, 0, false
	}
	defer syscall.Close(fd)
	const sockDiagByFamily = 20
	req := make([]byte, 16+56)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], sockDiagByFamily)
	ne.PutUint16(req[6:], syscall.NLM_F_REQUEST)
	// inet_diag_req_v2: family, protocol, ext, pad, states, then the sockid.
	req[16], req[17] = syscall.AF_INET, syscall.IPPROTO_TCP
	ne.PutUint32(req[20:], 0xffffffff)
	id := req[24:]
	binary.BigEndian.PutUint16(id[0:], uint16(local.Port))
	binary.BigEndian.PutUint16(id[2:], uint16(remote.Port))
	copy(id[4:8], l4)
	copy(id[20:24], r4)
	ne.PutUint32(id[40:], 0xffffffff) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xffffffff)
	if err := syscall.Sendto(fd, req, 0, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK}); err != nil {
		return 0, 0, false
	}
	buf := make([]byte, 8192)
	n, _, err := syscall.Recvfrom(fd, buf, 0)
	if err != nil || n < 16+72 || ne.Uint16(buf[4:]) != sockDiagByFamily {
		return 0, 0, false // NLMSG_ERROR: no such socket (yet)
	}
	// inet_diag_msg: family, state, timer, retrans, sockid (48), expires,
	// rqueue, wqueue, uid, inode.
	m := buf[16:]
	return ne.Uint32(m[56:]), ne.Uint32(m[68:]), true
}

// waitConsumed waits until pid has accepted c and read what the test wrote
// on it (on loopback a write is in the peer's receive queue when Write
// returns): a request written whole is then in flight in that process.
func waitConsumed(t testing.TB, c net.Conn, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !consumedBy(c, pid) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not accept and read connection %s within 10s", pid, c.LocalAddr())
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// waitNotListening waits until pid holds no listening TCP socket: a worker
// that closed its listeners has begun its drain.
func waitNotListening(t testing.TB, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(listeningAddrs(pid)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still listens on %v after 10s", pid, listeningAddrs(pid))
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}
