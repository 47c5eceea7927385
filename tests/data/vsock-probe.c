/* Run in a pod by tests/cluster.rs: tries to reach the node's agent (vsock port
 * 1024) the ways a pod could, through vsock loopback (CID 1), the guest's own CID
 * and the host (CID 2), and prints what happened. The agent must never answer. */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int main(void) {
    unsigned cids[] = {VMADDR_CID_LOCAL, VMADDR_CID_HOST, 3};
    for (unsigned i = 0; i < sizeof cids / sizeof cids[0]; i++) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) {
            printf("socket: %s\n", strerror(errno));
            return 0;
        }
        struct timeval tv = {.tv_sec = 10};
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cids[i], .svm_port = 1024};
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
            printf("cid %u: connect: %s\n", cids[i], strerror(errno));
            close(s);
            continue;
        }
        const char ping[] = "{\"op\":\"ping\"}\n";
        ssize_t w = write(s, ping, sizeof ping - 1);
        char buf[256] = {0};
        ssize_t n = read(s, buf, sizeof buf - 1);
        printf("cid %u: connected, write %zd, reply %zd bytes: [%s]\n", cids[i], w, n, n > 0 ? buf : "");
        close(s);
    }
    return 0;
}
