/*
 * listen_backlog.so: raise the backlog a program passes to listen(2).
 *
 * OpenSMTPD compiles its SMTP listen backlog in as 5.  A load client that opens 20
 * connections at once then loses SYNs, and every lost SYN costs a 1 s retransmit, which
 * measures the backlog rather than the server.  Preloaded, this shim turns any backlog below
 * $LISTEN_BACKLOG_MIN (default 128) into that value and leaves everything else alone.
 *
 *     gcc -shared -fPIC -O2 -o listen_backlog.so listen_backlog.c -ldl
 *     LD_PRELOAD=$PWD/listen_backlog.so smtpd -d -f smtpd.conf
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/socket.h>

typedef int (*listen_fn)(int, int);

int
listen(int fd, int backlog)
{
	static listen_fn real;
	static int minimum;
	const char *env;

	if (real == NULL) {
		real = (listen_fn)dlsym(RTLD_NEXT, "listen");
		env = getenv("LISTEN_BACKLOG_MIN");
		minimum = env != NULL ? atoi(env) : 128;
		if (minimum <= 0)
			minimum = 128;
	}
	if (backlog >= 0 && backlog < minimum)
		backlog = minimum;
	return real(fd, backlog);
}
