// Command example drives hostd's HostSwitch API from Go: it exposes a port, lists the
// forwards, reads the counters and unexposes the port again, printing each step.
//
//	example -api unix:///run/netferry/hostd.sock -local 127.0.0.1:8080 -remote 192.168.127.2:80
//
// Any failed call prints the gRPC status code and hostd's message (which names the offending
// field or the holder of an address) and exits 1. Build it with clients/go/build.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	netferryv1 "netferry.dev/netferry/clients/go/netferry/v1"
)

var protocols = map[string]netferryv1.Protocol{
	"tcp":  netferryv1.Protocol_PROTOCOL_TCP,
	"udp":  netferryv1.Protocol_PROTOCOL_UDP,
	"unix": netferryv1.Protocol_PROTOCOL_UNIX,
}

// dial connects to unix:///path, a bare /path, tcp://host:port or host:port (as the Python
// SDK accepts). Unix sockets are dialled by hand so that the :authority is "localhost".
func dial(ctx context.Context, api string) (*grpc.ClientConn, error) {
	// Block until connected, and fail at once (with the reason) when the socket is missing
	// or refuses, rather than retrying until the deadline.
	opts := []grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock(), grpc.FailOnNonTempDialError(true)}
	var target string
	switch {
	case strings.HasPrefix(api, "unix://") || strings.HasPrefix(api, "/"):
		path := strings.TrimPrefix(api, "unix://")
		if path == "" || !strings.HasPrefix(path, "/") {
			return nil, fmt.Errorf("-api %q: expected unix:///absolute/path", api)
		}
		target = "localhost"
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	case strings.HasPrefix(api, "tcp://"):
		target = strings.TrimPrefix(api, "tcp://")
	default:
		target = api
	}
	return grpc.DialContext(ctx, target, opts...)
}

func describe(f *netferryv1.Forward) string {
	proto := strings.ToLower(strings.TrimPrefix(f.GetProtocol().String(), "PROTOCOL_"))
	return fmt.Sprintf("%s %s -> %s (active %d, total %d, created %s)", proto, f.GetLocal(),
		f.GetRemote(), f.GetActive(), f.GetTotal(),
		f.GetCreated().AsTime().UTC().Format(time.RFC3339))
}

// codeName spells a status code as the gRPC spec (and the Python SDK) does: ALREADY_EXISTS.
func codeName(c codes.Code) string {
	var b strings.Builder
	prev := rune(0)
	for _, r := range c.String() {
		if unicode.IsUpper(r) && unicode.IsLower(prev) {
			b.WriteByte('_')
		}
		b.WriteRune(unicode.ToUpper(r))
		prev = r
	}
	return b.String()
}

// fail prints "error: STEP: CODE: message" and exits 1.
func fail(step string, err error) {
	if s, ok := status.FromError(err); ok {
		fmt.Fprintf(os.Stderr, "error: %s: %s: %s\n", step, codeName(s.Code()), s.Message())
	} else {
		fmt.Fprintf(os.Stderr, "error: %s: %v\n", step, err)
	}
	os.Exit(1)
}

func main() {
	api := flag.String("api", os.Getenv("NETFERRY_API"), "hostd API: unix:///path or tcp://host:port (default $NETFERRY_API)")
	protoName := flag.String("protocol", "tcp", "forward protocol: tcp, udp or unix")
	local := flag.String("local", "127.0.0.1:8080", "host side: HOST:PORT, :PORT or a socket path")
	remote := flag.String("remote", "192.168.127.2:80", "guest side: IPV4:PORT")
	timeout := flag.Float64("timeout", 10, "deadline of each step, in seconds")
	keep := flag.Bool("keep", false, "leave the forward in place (skip Unexpose)")
	flag.Parse()
	if *api == "" {
		fmt.Fprintln(os.Stderr, "error: -api is required (or set NETFERRY_API)")
		os.Exit(2)
	}
	if *timeout <= 0 {
		fmt.Fprintf(os.Stderr, "error: -timeout %v: expected seconds > 0\n", *timeout)
		os.Exit(2)
	}
	proto, ok := protocols[strings.ToLower(*protoName)]
	if !ok {
		fmt.Fprintf(os.Stderr, "error: -protocol %q: expected tcp, udp or unix\n", *protoName)
		os.Exit(2)
	}

	step := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), time.Duration(*timeout*float64(time.Second)))
	}

	ctx, cancel := step()
	conn, err := dial(ctx, *api)
	cancel()
	if err != nil {
		fail("dial "+*api, err)
	}
	defer conn.Close()
	client := netferryv1.NewHostSwitchClient(conn)
	fmt.Printf("connected: %s\n", *api)

	ctx, cancel = step()
	exposed, err := client.Expose(ctx, &netferryv1.ExposeRequest{Protocol: proto, Local: *local, Remote: *remote})
	cancel()
	if err != nil {
		fail("Expose", err)
	}
	fmt.Printf("exposed: %s\n", describe(exposed.GetForward()))

	ctx, cancel = step()
	list, err := client.ListForwards(ctx, &netferryv1.ListForwardsRequest{})
	cancel()
	if err != nil {
		fail("ListForwards", err)
	}
	fmt.Printf("forwards: %d\n", len(list.GetForwards()))
	for _, f := range list.GetForwards() {
		fmt.Printf("  forward: %s\n", describe(f))
	}

	ctx, cancel = step()
	st, err := client.GetStats(ctx, &netferryv1.GetStatsRequest{})
	cancel()
	if err != nil {
		fail("GetStats", err)
	}
	s := st.GetStats()
	fmt.Printf("stats: frames_in=%d frames_out=%d bytes_in=%d bytes_out=%d forwards=%d tcp_connections=%d udp_flows=%d links=%d counters=%d\n",
		s.GetFramesIn(), s.GetFramesOut(), s.GetBytesIn(), s.GetBytesOut(), s.GetForwards(),
		s.GetTcpConnections(), s.GetUdpFlows(), len(s.GetLinks()), len(s.GetCounters()))

	if *keep {
		fmt.Println("kept: the forward stays in place (-keep)")
		return
	}
	ctx, cancel = step()
	removed, err := client.Unexpose(ctx, &netferryv1.UnexposeRequest{Protocol: proto, Local: exposed.GetForward().GetLocal()})
	cancel()
	if err != nil {
		fail("Unexpose", err)
	}
	fmt.Printf("unexposed: %s\n", describe(removed.GetForward()))
}
