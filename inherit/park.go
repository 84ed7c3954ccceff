package inherit

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// A parker holds handed-off connections of a client-speaks-first protocol
// (HTTP) as bare fds in an epoll set until their client sends something.
// Ten thousand idle keep-alive connections thus cost ten thousand
// epoll_ctl calls, not ten thousand net.Conns, goroutines and buffers.
type parker struct {
	epfd int

	mu     sync.Mutex
	parked map[int]parkedConn
	closed bool
}

type parkedConn struct {
	l     *Listener
	state []byte
}

func newParker() (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("handoff: epoll_create1: %w", err)
	}
	p := &parker{epfd: epfd, parked: map[int]parkedConn{}}
	go p.wait()
	return p, nil
}

// park adds fd, owned by the parker from now on; if it cannot, it delivers
// the connection to l at once.
func (p *parker) park(fd int, l *Listener, state []byte) {
	p.mu.Lock()
	if !p.closed {
		p.parked[fd] = parkedConn{l, state}
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(fd)}
		if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err == nil {
			p.mu.Unlock()
			return
		}
		delete(p.parked, fd)
	}
	p.mu.Unlock()
	deliverFD(fd, l, state)
}

// wait delivers parked connections as they turn readable.
func (p *parker) wait() {
	events := make([]unix.EpollEvent, 256)
	for {
		n, err := unix.EpollWait(p.epfd, events, 1000)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		ready := make([]int, n)
		for i := range ready {
			ready[i] = int(events[i].Fd)
		}
		p.take(ready)
		p.mu.Lock()
		closed := p.closed
		p.mu.Unlock()
		if closed || err != nil {
			return
		}
	}
}

// flush delivers every connection parked for l: it is closing, and they
// must go to its server (which hands them on when it drains).
func (p *parker) flush(l *Listener) {
	p.mu.Lock()
	var fds []int
	for fd, pc := range p.parked {
		if pc.l == l {
			fds = append(fds, fd)
		}
	}
	p.mu.Unlock()
	p.take(fds)
}

// take delivers those of fds that are parked (another caller may have
// taken one meanwhile: whoever removes it from the set owns it).
func (p *parker) take(fds []int) {
	p.mu.Lock()
	var got []int
	var meta []parkedConn
	for _, fd := range fds {
		if pc, ok := p.parked[fd]; ok {
			delete(p.parked, fd)
			unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, fd, nil)
			got, meta = append(got, fd), append(meta, pc)
		}
	}
	p.mu.Unlock()
	for i, fd := range got {
		deliverFD(fd, meta[i].l, meta[i].state)
	}
}

// deliverFD turns fd into a connection for l (which counted it reserved).
func deliverFD(fd int, l *Listener, state []byte) {
	c, err := fileConn(fd)
	if err != nil {
		fmt.Fprintf(os.Stderr, "upgrader handoff: connection lost: %v\n", err)
		l.deliver(nil, 1)
		return
	}
	l.deliver([]*Conn{{Conn: c, Kind: l.kind, State: state}}, 1)
}
